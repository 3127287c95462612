//! The config store: a xenstore-like tree of nodes with permissions, watches, transactions and
//! per-domain quotas.
//!
//! Paths are Xen's: absolute (`/local/domain/3/device/vbd/0/state`) or relative to the caller's
//! home `/local/domain/<id>`. Each node carries a permission list: the first entry names the
//! owner and the access everyone else gets; later entries grant access to specific domains. Dom0
//! may do anything; the owner may do anything to its node. Guests reach the store through
//! the `pvdev` ring server; dom0 calls this API directly.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use pv_protocol::grant::DomId;
use pv_protocol::store::{Perm, PermKind, StoreErrno};

/// Limits for one (non-dom0) domain.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    /// Nodes a domain may own.
    pub nodes: usize,
    /// Bytes in one node's value.
    pub value_bytes: usize,
    /// Watches a domain may hold.
    pub watches: usize,
    /// Transactions a domain may have open.
    pub transactions: usize,
    /// Watch events queued for a domain that does not read them.
    pub queued_events: usize,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            nodes: 1000,
            value_bytes: 2048,
            watches: 128,
            transactions: 10,
            queued_events: 1024,
        }
    }
}

/// Result alias: store operations fail with the errno the guest sees.
pub type Result<T> = std::result::Result<T, StoreErrno>;

#[derive(Debug, Clone)]
struct Node {
    value: Vec<u8>,
    perms: Vec<Perm>,
}

#[derive(Debug)]
struct Watch {
    domid: u32,
    path: String,
    token: String,
}

#[derive(Debug)]
struct Tx {
    domid: u32,
    nodes: BTreeMap<String, Node>,
    start_gen: u64,
    touched: BTreeSet<String>,
}

/// Called when a domain has new watch events queued.
pub type Wake = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<String, Node>,
    /// Generation of the last change to each path (including removals).
    changed: HashMap<String, u64>,
    generation: u64,
    watches: Vec<Watch>,
    txs: HashMap<u32, Tx>,
    next_tx: u32,
    events: HashMap<u32, VecDeque<(String, String)>>,
    wakers: HashMap<u32, Arc<Wake>>,
    quota: Quota,
}

/// The store.
pub struct Store {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new(Quota::default())
    }
}

/// `/local/domain/<id>`.
pub fn home(domid: u32) -> String {
    format!("/local/domain/{domid}")
}

fn perm(kind: PermKind, domid: u32) -> Perm {
    Perm {
        kind,
        domid: DomId(domid as u16),
    }
}

fn parent(path: &str) -> Option<&str> {
    match path.rfind('/') {
        Some(0) if path.len() > 1 => Some("/"),
        Some(0) | None => None,
        Some(i) => Some(&path[..i]),
    }
}

fn owned_by(nodes: &BTreeMap<String, Node>, domid: u32) -> usize {
    nodes
        .values()
        .filter(|n| {
            n.perms
                .first()
                .is_some_and(|p| u32::from(p.domid.0) == domid)
        })
        .count()
}

fn can(domid: u32, node: &Node, want: PermKind) -> bool {
    if domid == 0 {
        return true;
    }
    let Some(first) = node.perms.first() else {
        return false;
    };
    if u32::from(first.domid.0) == domid {
        return true;
    }
    let kind = node
        .perms
        .iter()
        .skip(1)
        .find(|p| u32::from(p.domid.0) == domid)
        .map_or(first.kind, |p| p.kind);
    kind == PermKind::Both || kind == want
}

impl Store {
    /// An empty store with `/` and `/local/domain` owned by dom0 (no access for others).
    pub fn new(quota: Quota) -> Self {
        let mut inner = Inner {
            quota,
            next_tx: 1,
            ..Default::default()
        };
        for p in ["/", "/local", "/local/domain"] {
            inner.nodes.insert(
                p.into(),
                Node {
                    value: Vec::new(),
                    perms: vec![perm(PermKind::None, 0)],
                },
            );
        }
        Self {
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves a guest-supplied path (relative ones live under the caller's home).
    pub fn absolute(domid: u32, path: &str) -> String {
        if path.starts_with('/') {
            path.to_string()
        } else {
            format!("{}/{path}", home(domid))
        }
    }

    /// Prepares a domain's home: `/local/domain/<id>` owned by it, readable by nobody else, with
    /// `name` and `domid` nodes written by dom0; `wake` is called when watch events are queued.
    pub fn introduce(&self, domid: u32, name: &str, wake: Wake) {
        let h = home(domid);
        let mut g = self.lock();
        g.wakers.insert(domid, Arc::new(wake));
        drop(g);
        let _ = self.write(0, 0, &h, b"");
        let _ = self.set_perms(0, 0, &h, &[perm(PermKind::None, domid)]);
        let _ = self.write(0, 0, &format!("{h}/name"), name.as_bytes());
        let _ = self.write(0, 0, &format!("{h}/domid"), domid.to_string().as_bytes());
    }

    /// Forgets a domain: its home subtree, watches, transactions and queued events.
    pub fn release(&self, domid: u32) {
        let _ = self.rm(0, 0, &home(domid));
        let mut g = self.lock();
        g.watches.retain(|w| w.domid != domid);
        g.txs.retain(|_, t| t.domid != domid);
        g.events.remove(&domid);
        g.wakers.remove(&domid);
    }

    /// Takes the next queued watch event `(path, token)` for `domid`.
    pub fn next_event(&self, domid: u32) -> Option<(String, String)> {
        self.lock().events.get_mut(&domid)?.pop_front()
    }

    /// Reads a node.
    pub fn read(&self, domid: u32, tx: u32, path: &str) -> Result<Vec<u8>> {
        let mut g = self.lock();
        let path = Self::absolute(domid, path);
        let nodes = g.view(domid, tx, &path)?;
        let n = nodes.get(&path).ok_or(StoreErrno::ENOENT)?;
        if !can(domid, n, PermKind::Read) {
            return Err(StoreErrno::EACCES);
        }
        Ok(n.value.clone())
    }

    /// Lists a node's children.
    pub fn directory(&self, domid: u32, tx: u32, path: &str) -> Result<Vec<String>> {
        let mut g = self.lock();
        let path = Self::absolute(domid, path);
        let nodes = g.view(domid, tx, &path)?;
        let n = nodes.get(&path).ok_or(StoreErrno::ENOENT)?;
        if !can(domid, n, PermKind::Read) {
            return Err(StoreErrno::EACCES);
        }
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        Ok(nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('/'))
            .map(|(k, _)| k[prefix.len()..].to_string())
            .collect())
    }

    /// Writes a node, creating missing ancestors (which need write access to the nearest existing
    /// one, and inherit its permissions with the writer as owner).
    pub fn write(&self, domid: u32, tx: u32, path: &str, value: &[u8]) -> Result<()> {
        let mut g = self.lock();
        if domid != 0 && value.len() > g.quota.value_bytes {
            return Err(StoreErrno::E2BIG);
        }
        let path = Self::absolute(domid, path);
        let quota = g.quota.nodes;
        let mut created = Vec::new();
        {
            let nodes = g.view_mut(domid, tx)?;
            if let Some(n) = nodes.get(&path) {
                if !can(domid, n, PermKind::Write) {
                    return Err(StoreErrno::EACCES);
                }
            } else {
                // Walk up to the nearest existing ancestor.
                let mut missing = vec![path.clone()];
                let mut p = parent(&path);
                let base = loop {
                    let Some(pp) = p else {
                        return Err(StoreErrno::ENOENT);
                    };
                    if let Some(n) = nodes.get(pp) {
                        break n.clone();
                    }
                    missing.push(pp.to_string());
                    p = parent(pp);
                };
                if !can(domid, &base, PermKind::Write) {
                    return Err(StoreErrno::EACCES);
                }
                // Counted by scanning: writes are not a hot path, and the total is bounded by the
                // quotas themselves.
                if domid != 0 && owned_by(nodes, domid) + missing.len() > quota {
                    return Err(StoreErrno::ENOSPC);
                }
                let mut perms = base.perms.clone();
                if let Some(first) = perms.first_mut().filter(|_| domid != 0) {
                    first.domid = DomId(domid as u16);
                }
                for m in missing.into_iter().rev() {
                    nodes.insert(
                        m.clone(),
                        Node {
                            value: Vec::new(),
                            perms: perms.clone(),
                        },
                    );
                    created.push(m);
                }
            }
            if let Some(n) = nodes.get_mut(&path) {
                n.value = value.to_vec();
            }
        }
        g.touched(domid, tx, &path, &created);
        Ok(())
    }

    /// Creates a node if it does not exist.
    pub fn mkdir(&self, domid: u32, tx: u32, path: &str) -> Result<()> {
        match self.read(domid, tx, path) {
            Ok(_) => Ok(()),
            Err(StoreErrno::ENOENT) => self.write(domid, tx, path, b""),
            Err(e) => Err(e),
        }
    }

    /// Removes a node and its subtree.
    pub fn rm(&self, domid: u32, tx: u32, path: &str) -> Result<()> {
        let mut g = self.lock();
        let path = Self::absolute(domid, path);
        if path == "/" {
            return Err(StoreErrno::EINVAL);
        }
        let removed: Vec<String>;
        {
            let nodes = g.view_mut(domid, tx)?;
            let n = nodes.get(&path).ok_or(StoreErrno::ENOENT)?;
            if !can(domid, n, PermKind::Write) {
                return Err(StoreErrno::EACCES);
            }
            let prefix = format!("{path}/");
            let doomed: Vec<String> = std::iter::once(path.clone())
                .chain(
                    nodes
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .map(|(k, _)| k.clone()),
                )
                .collect();
            for k in &doomed {
                nodes.remove(k);
            }
            removed = doomed;
        }
        g.touched(domid, tx, &path, &removed);
        Ok(())
    }

    /// A node's permission list.
    pub fn get_perms(&self, domid: u32, tx: u32, path: &str) -> Result<Vec<Perm>> {
        let mut g = self.lock();
        let path = Self::absolute(domid, path);
        let nodes = g.view(domid, tx, &path)?;
        let n = nodes.get(&path).ok_or(StoreErrno::ENOENT)?;
        if !can(domid, n, PermKind::Read) {
            return Err(StoreErrno::EACCES);
        }
        Ok(n.perms.clone())
    }

    /// Replaces a node's permission list (owner or dom0 only; a guest cannot give a node away).
    pub fn set_perms(&self, domid: u32, tx: u32, path: &str, perms: &[Perm]) -> Result<()> {
        if perms.is_empty() {
            return Err(StoreErrno::EINVAL);
        }
        let mut g = self.lock();
        let path = Self::absolute(domid, path);
        {
            let nodes = g.view_mut(domid, tx)?;
            let n = nodes.get_mut(&path).ok_or(StoreErrno::ENOENT)?;
            let owner = n.perms.first().map_or(0, |p| u32::from(p.domid.0));
            if domid != 0 && (owner != domid || u32::from(perms[0].domid.0) != domid) {
                return Err(StoreErrno::EACCES);
            }
            n.perms = perms.to_vec();
        }
        g.touched(domid, tx, &path, &[]);
        Ok(())
    }

    /// Registers a watch; like Xen, it fires once at once.
    pub fn watch(&self, domid: u32, path: &str, token: &str) -> Result<()> {
        let mut g = self.lock();
        let held = g.watches.iter().filter(|w| w.domid == domid).count();
        if domid != 0 && held >= g.quota.watches {
            return Err(StoreErrno::ENOSPC);
        }
        let path = Self::absolute(domid, path);
        if g.watches
            .iter()
            .any(|w| w.domid == domid && w.path == path && w.token == token)
        {
            return Err(StoreErrno::EEXIST);
        }
        g.watches.push(Watch {
            domid,
            path: path.clone(),
            token: token.to_string(),
        });
        g.queue_event(domid, &path, token);
        Ok(())
    }

    /// Removes a watch.
    pub fn unwatch(&self, domid: u32, path: &str, token: &str) -> Result<()> {
        let mut g = self.lock();
        let path = Self::absolute(domid, path);
        let before = g.watches.len();
        g.watches
            .retain(|w| !(w.domid == domid && w.path == path && w.token == token));
        if g.watches.len() == before {
            return Err(StoreErrno::ENOENT);
        }
        Ok(())
    }

    /// Starts a transaction; returns its id.
    pub fn transaction_start(&self, domid: u32) -> Result<u32> {
        let mut g = self.lock();
        let open = g.txs.values().filter(|t| t.domid == domid).count();
        if domid != 0 && open >= g.quota.transactions {
            return Err(StoreErrno::ENOSPC);
        }
        let id = g.next_tx;
        g.next_tx = g.next_tx.wrapping_add(1).max(1);
        let tx = Tx {
            domid,
            nodes: g.nodes.clone(),
            start_gen: g.generation,
            touched: BTreeSet::new(),
        };
        g.txs.insert(id, tx);
        Ok(id)
    }

    /// Ends a transaction: applies it if `commit` and nothing it touched changed meanwhile
    /// (else `EAGAIN`, and nothing is applied).
    pub fn transaction_end(&self, domid: u32, tx: u32, commit: bool) -> Result<()> {
        let mut g = self.lock();
        let t = match g.txs.remove(&tx) {
            Some(t) if t.domid == domid => t,
            Some(t) => {
                g.txs.insert(tx, t);
                return Err(StoreErrno::ENOENT);
            }
            None => return Err(StoreErrno::ENOENT),
        };
        if !commit {
            return Ok(());
        }
        let conflict = t
            .touched
            .iter()
            .any(|p| g.changed.get(p).is_some_and(|&c| c > t.start_gen));
        if conflict {
            return Err(StoreErrno::EAGAIN);
        }
        for p in &t.touched {
            match t.nodes.get(p) {
                Some(n) => g.nodes.insert(p.clone(), n.clone()),
                None => g.nodes.remove(p),
            };
        }
        let touched: Vec<String> = t.touched.into_iter().collect();
        for p in &touched {
            g.mark_changed(p);
        }
        Ok(())
    }
}

impl Inner {
    /// The tree an operation sees: the live one, or its transaction's copy.
    fn view(&mut self, domid: u32, tx: u32, _path: &str) -> Result<&BTreeMap<String, Node>> {
        if tx == 0 {
            return Ok(&self.nodes);
        }
        match self.txs.get(&tx) {
            Some(t) if t.domid == domid => Ok(&t.nodes),
            _ => Err(StoreErrno::ENOENT),
        }
    }

    fn view_mut(&mut self, domid: u32, tx: u32) -> Result<&mut BTreeMap<String, Node>> {
        if tx == 0 {
            return Ok(&mut self.nodes);
        }
        match self.txs.get_mut(&tx) {
            Some(t) if t.domid == domid => Ok(&mut t.nodes),
            _ => Err(StoreErrno::ENOENT),
        }
    }

    /// Records a change to `path` (and `extra` paths) made by `domid` in `tx`.
    fn touched(&mut self, _domid: u32, tx: u32, path: &str, extra: &[String]) {
        if tx != 0 {
            if let Some(t) = self.txs.get_mut(&tx) {
                t.touched.insert(path.to_string());
                t.touched.extend(extra.iter().cloned());
            }
            return;
        }
        self.mark_changed(path);
        for p in extra {
            if p != path {
                self.changed.insert(p.clone(), self.generation);
            }
        }
    }

    fn mark_changed(&mut self, path: &str) {
        self.generation += 1;
        self.changed.insert(path.to_string(), self.generation);
        // A change fires watches on the path and its ancestors; removing a parent also fires
        // watches below it.
        let hits: Vec<(u32, String)> = self
            .watches
            .iter()
            .filter(|w| {
                path == w.path
                    || path.starts_with(&format!("{}/", w.path.trim_end_matches('/')))
                    || w.path.starts_with(&format!("{path}/"))
            })
            .filter(|w| {
                let node = self.nodes.get(path).or_else(|| self.nodes.get(&w.path));
                node.is_none_or(|n| can(w.domid, n, PermKind::Read))
            })
            .map(|w| (w.domid, w.token.clone()))
            .collect();
        for (domid, token) in hits {
            self.queue_event(domid, path, &token);
        }
    }

    fn queue_event(&mut self, domid: u32, path: &str, token: &str) {
        let cap = self.quota.queued_events;
        let q = self.events.entry(domid).or_default();
        if domid != 0 && q.len() >= cap {
            // A domain that does not read its events loses the oldest, not the host's memory.
            q.pop_front();
        }
        q.push_back((path.to_string(), token.to_string()));
        if let Some(w) = self.wakers.get(&domid) {
            w();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        let s = Store::default();
        s.introduce(2, "two", Box::new(|| {}));
        s.introduce(3, "three", Box::new(|| {}));
        s
    }

    #[test]
    fn domains_see_their_home_but_not_each_others() {
        let s = store();
        assert_eq!(s.read(2, 0, "name").unwrap(), b"two");
        assert_eq!(s.read(2, 0, "/local/domain/2/domid").unwrap(), b"2");
        assert_eq!(
            s.read(2, 0, "/local/domain/3/name"),
            Err(StoreErrno::EACCES)
        );
        assert_eq!(
            s.write(2, 0, "/local/domain/3/x", b"y"),
            Err(StoreErrno::EACCES)
        );
        assert_eq!(s.rm(2, 0, "/local/domain/3"), Err(StoreErrno::EACCES));
        assert_eq!(s.directory(3, 0, "/local/domain"), Err(StoreErrno::EACCES));
        assert_eq!(s.read(0, 0, "/local/domain/3/name").unwrap(), b"three");
    }

    #[test]
    fn write_creates_parents_owned_by_the_writer_and_rm_removes_subtrees() {
        let s = store();
        s.write(2, 0, "device/vbd/51712/state", b"1").unwrap();
        assert_eq!(s.directory(2, 0, "device/vbd").unwrap(), ["51712"]);
        let perms = s.get_perms(2, 0, "device/vbd").unwrap();
        assert_eq!(perms[0].domid, DomId(2));
        s.rm(2, 0, "device").unwrap();
        assert_eq!(
            s.read(2, 0, "device/vbd/51712/state"),
            Err(StoreErrno::ENOENT)
        );
    }

    #[test]
    fn dom0_can_share_a_node_with_a_guest() {
        let s = store();
        s.write(0, 0, "/backend/vbd/2/51712/state", b"2").unwrap();
        assert_eq!(
            s.read(2, 0, "/backend/vbd/2/51712/state"),
            Err(StoreErrno::EACCES)
        );
        s.set_perms(
            0,
            0,
            "/backend/vbd/2/51712/state",
            &[perm(PermKind::None, 0), perm(PermKind::Read, 2)],
        )
        .unwrap();
        assert_eq!(s.read(2, 0, "/backend/vbd/2/51712/state").unwrap(), b"2");
        assert_eq!(
            s.write(2, 0, "/backend/vbd/2/51712/state", b"6"),
            Err(StoreErrno::EACCES)
        );
        assert_eq!(
            s.read(3, 0, "/backend/vbd/2/51712/state"),
            Err(StoreErrno::EACCES)
        );
    }

    #[test]
    fn a_guest_cannot_give_its_nodes_away_or_take_others() {
        let s = store();
        s.write(2, 0, "x", b"").unwrap();
        assert_eq!(
            s.set_perms(2, 0, "x", &[perm(PermKind::None, 3)]),
            Err(StoreErrno::EACCES)
        );
        assert_eq!(
            s.set_perms(3, 0, "/local/domain/2/x", &[perm(PermKind::Both, 3)]),
            Err(StoreErrno::EACCES)
        );
        s.set_perms(
            2,
            0,
            "x",
            &[perm(PermKind::None, 2), perm(PermKind::Read, 3)],
        )
        .unwrap();
        assert_eq!(s.read(3, 0, "/local/domain/2/x").unwrap(), b"");
    }

    #[test]
    fn watches_fire_on_registration_and_on_changes_below_them() {
        let s = store();
        s.watch(2, "device", "tok").unwrap();
        assert_eq!(
            s.next_event(2),
            Some(("/local/domain/2/device".into(), "tok".into()))
        );
        s.write(2, 0, "device/vif/0", b"x").unwrap();
        let ev: Vec<_> = std::iter::from_fn(|| s.next_event(2)).collect();
        assert!(
            ev.contains(&("/local/domain/2/device/vif/0".into(), "tok".into())),
            "{ev:?}"
        );
        s.write(2, 0, "other", b"x").unwrap();
        assert_eq!(s.next_event(2), None);
        // Watching another domain's subtree tells nothing about it.
        s.watch(3, "/local/domain/2", "spy").unwrap();
        s.next_event(3);
        s.write(2, 0, "secret", b"x").unwrap();
        assert_eq!(s.next_event(3), None);
        s.unwatch(2, "device", "tok").unwrap();
        assert_eq!(s.unwatch(2, "device", "tok"), Err(StoreErrno::ENOENT));
    }

    #[test]
    fn transactions_commit_atomically_and_detect_conflicts() {
        let s = store();
        s.write(2, 0, "a", b"1").unwrap();
        let t = s.transaction_start(2).unwrap();
        s.write(2, t, "a", b"2").unwrap();
        s.write(2, t, "b", b"3").unwrap();
        assert_eq!(s.read(2, 0, "a").unwrap(), b"1", "invisible until commit");
        s.transaction_end(2, t, true).unwrap();
        assert_eq!(s.read(2, 0, "a").unwrap(), b"2");
        assert_eq!(s.read(2, 0, "b").unwrap(), b"3");

        let t = s.transaction_start(2).unwrap();
        s.write(2, t, "a", b"from tx").unwrap();
        s.write(2, 0, "a", b"outside").unwrap();
        assert_eq!(s.transaction_end(2, t, true), Err(StoreErrno::EAGAIN));
        assert_eq!(s.read(2, 0, "a").unwrap(), b"outside");
        // Another domain cannot end our transaction.
        let t = s.transaction_start(2).unwrap();
        assert_eq!(s.transaction_end(3, t, true), Err(StoreErrno::ENOENT));
        s.transaction_end(2, t, false).unwrap();
    }

    #[test]
    fn quotas_stop_an_abusive_guest() {
        let s = Store::new(Quota {
            nodes: 20,
            ..Quota::default()
        });
        s.introduce(2, "two", Box::new(|| {}));
        let mut n = 0;
        let err = loop {
            match s.write(2, 0, &format!("n{n}"), b"x") {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(err, StoreErrno::ENOSPC);
        assert!(n <= 20);
        assert_eq!(s.write(2, 0, "name", &[0; 4096]), Err(StoreErrno::E2BIG));
        // Removing frees quota.
        s.rm(2, 0, "n0").unwrap();
        s.write(2, 0, "again", b"x").unwrap();
        for _ in 0..10 {
            s.transaction_start(2).unwrap();
        }
        assert_eq!(s.transaction_start(2), Err(StoreErrno::ENOSPC));
    }

    #[test]
    fn release_forgets_a_domain() {
        let s = store();
        s.write(2, 0, "x", b"1").unwrap();
        s.watch(2, "x", "t").unwrap();
        s.release(2);
        assert_eq!(s.read(0, 0, "/local/domain/2/x"), Err(StoreErrno::ENOENT));
        assert_eq!(s.next_event(2), None);
    }
}
