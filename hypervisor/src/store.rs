//! The config store: a xenstore-like tree of nodes with permissions, watches, transactions and
//! per-domain quotas.
//!
//! Paths are Xen's: absolute (`/local/domain/3/device/vbd/0/state`) or relative to the caller's
//! home `/local/domain/<id>`. Each node carries a permission list: the first entry names the
//! owner and the access everyone else gets; later entries grant access to specific domains. Dom0
//! may do anything; the owner may do anything to its node. Guests reach the store through
//! the `pvdev` ring server; dom0 calls this API directly.

use std::collections::{BTreeMap, HashMap, VecDeque};
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
    /// Generation of the node's last change (transactions compare it with their start).
    generation: u64,
}

impl Node {
    fn owner(&self) -> u32 {
        self.perms.first().map_or(0, |p| u32::from(p.domid.0))
    }
}

#[derive(Debug)]
struct Watch {
    domid: u32,
    path: String,
    /// `path` with one trailing `/`, to match descendants without formatting per change.
    below: String,
    token: String,
}

/// An open transaction: only what it changed (an overlay on the live tree, `None` = removed),
/// never a copy of the store.
#[derive(Debug)]
struct Tx {
    domid: u32,
    start_gen: u64,
    over: BTreeMap<String, Option<Node>>,
}

/// Called when a domain has new watch events queued.
pub type Wake = Box<dyn Fn() + Send + Sync>;

/// Removed paths remembered for open transactions' conflict checks; beyond this many, they are
/// all forgotten and every transaction open at that point fails its commit with `EAGAIN`.
const MAX_TOMBSTONES: usize = 16384;

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<String, Node>,
    /// Nodes each domain owns (the quota counts them).
    owned: HashMap<u32, usize>,
    generation: u64,
    /// Paths removed while transactions are open, with the generation of the removal.
    tombstones: HashMap<String, u64>,
    /// Transactions that started before this generation cannot commit (tombstones were lost).
    tombstone_floor: u64,
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

/// Drops `id`'s entries from `perms` and gives the node to dom0 if `id` owned it (the access
/// everyone else gets stays); `true` when the owner changed.
fn forget_in(perms: &mut Vec<Perm>, id: DomId) -> bool {
    if perms.len() > 1 {
        let rest: Vec<Perm> = perms.drain(1..).filter(|p| p.domid != id).collect();
        perms.extend(rest);
    }
    match perms.first_mut() {
        Some(owner) if owner.domid == id => {
            owner.domid = DomId::DOM0;
            true
        }
        _ => false,
    }
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
            inner.put_live(
                p,
                Node {
                    value: Vec::new(),
                    perms: vec![perm(PermKind::None, 0)],
                    generation: 0,
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
    ///
    /// Domain ids are reused, so the new domain starts from nothing: whatever still names the id
    /// (written after the last domain with it was released) is forgotten first, as in
    /// [`release`](Self::release).
    pub fn introduce(&self, domid: u32, name: &str, wake: Wake) {
        let h = home(domid);
        self.release(domid);
        self.lock().wakers.insert(domid, Arc::new(wake));
        let _ = self.write(0, 0, &h, b"");
        let _ = self.set_perms(0, 0, &h, &[perm(PermKind::None, domid)]);
        let _ = self.write(0, 0, &format!("{h}/name"), name.as_bytes());
        let _ = self.write(0, 0, &format!("{h}/domid"), domid.to_string().as_bytes());
    }

    /// Forgets a domain: its home subtree, watches, transactions and queued events, and every
    /// trace of its id elsewhere, so that a later domain given the same id inherits nothing
    /// (Xen's XSA-322): nodes it owned outside its home pass to dom0, and permission entries
    /// naming it are dropped, in the live tree and in other domains' open transactions.
    pub fn release(&self, domid: u32) {
        if domid == 0 {
            return;
        }
        let _ = self.rm(0, 0, &home(domid));
        let mut g = self.lock();
        g.watches.retain(|w| w.domid != domid);
        g.txs.retain(|_, t| t.domid != domid);
        g.events.remove(&domid);
        g.wakers.remove(&domid);
        g.forget_perms(domid);
        g.trim_tombstones();
    }

    /// Takes the next queued watch event `(path, token)` for `domid`.
    pub fn next_event(&self, domid: u32) -> Option<(String, String)> {
        self.lock().events.get_mut(&domid)?.pop_front()
    }

    /// Reads a node.
    pub fn read(&self, domid: u32, tx: u32, path: &str) -> Result<Vec<u8>> {
        let g = self.lock();
        g.check_tx(domid, tx)?;
        let path = Self::absolute(domid, path);
        let n = g.get(tx, &path).ok_or(StoreErrno::ENOENT)?;
        if !can(domid, n, PermKind::Read) {
            return Err(StoreErrno::EACCES);
        }
        Ok(n.value.clone())
    }

    /// Lists a node's children.
    pub fn directory(&self, domid: u32, tx: u32, path: &str) -> Result<Vec<String>> {
        let g = self.lock();
        g.check_tx(domid, tx)?;
        let path = Self::absolute(domid, path);
        let n = g.get(tx, &path).ok_or(StoreErrno::ENOENT)?;
        if !can(domid, n, PermKind::Read) {
            return Err(StoreErrno::EACCES);
        }
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        Ok(g.below(tx, &prefix)
            .into_iter()
            .filter(|k| !k[prefix.len()..].contains('/'))
            .map(|k| k[prefix.len()..].to_string())
            .collect())
    }

    /// Writes a node, creating missing ancestors (which need write access to the nearest existing
    /// one, and inherit its permissions with the writer as owner).
    pub fn write(&self, domid: u32, tx: u32, path: &str, value: &[u8]) -> Result<()> {
        let mut g = self.lock();
        if domid != 0 && value.len() > g.quota.value_bytes {
            return Err(StoreErrno::E2BIG);
        }
        g.check_tx(domid, tx)?;
        let path = Self::absolute(domid, path);
        let node = match g.get(tx, &path) {
            Some(n) => {
                if !can(domid, n, PermKind::Write) {
                    return Err(StoreErrno::EACCES);
                }
                Node {
                    value: value.to_vec(),
                    ..n.clone()
                }
            }
            None => {
                // Walk up to the nearest existing ancestor.
                let mut missing = vec![path.clone()];
                let mut p = parent(&path);
                let base = loop {
                    let Some(pp) = p else {
                        return Err(StoreErrno::ENOENT);
                    };
                    if let Some(n) = g.get(tx, pp) {
                        break n.clone();
                    }
                    missing.push(pp.to_string());
                    p = parent(pp);
                };
                if !can(domid, &base, PermKind::Write) {
                    return Err(StoreErrno::EACCES);
                }
                if domid != 0 {
                    g.room_for(domid, tx, missing.len())?;
                }
                let mut perms = base.perms.clone();
                if let Some(first) = perms.first_mut().filter(|_| domid != 0) {
                    first.domid = DomId(domid as u16);
                }
                let fresh = |value: Vec<u8>| Node {
                    value,
                    perms: perms.clone(),
                    generation: 0,
                };
                // Parents first; the node itself below.
                for m in missing[1..].iter().rev() {
                    g.put(tx, m, Some(fresh(Vec::new())));
                }
                fresh(value.to_vec())
            }
        };
        let fired = node.clone();
        g.put(tx, &path, Some(node));
        if tx == 0 {
            g.fire(&path, &fired);
        }
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
        g.check_tx(domid, tx)?;
        let path = Self::absolute(domid, path);
        if path == "/" {
            return Err(StoreErrno::EINVAL);
        }
        let n = g.get(tx, &path).ok_or(StoreErrno::ENOENT)?.clone();
        if !can(domid, &n, PermKind::Write) {
            return Err(StoreErrno::EACCES);
        }
        let doomed = g.below(tx, &format!("{path}/"));
        if tx != 0 && domid != 0 {
            g.room_for(domid, tx, doomed.len() + 1)?;
        }
        for k in doomed.iter().chain(std::iter::once(&path)) {
            g.put(tx, k, None);
        }
        if tx == 0 {
            // Watchers learn of the removal if they could read the node it removed.
            g.fire(&path, &n);
        }
        Ok(())
    }

    /// A node's permission list.
    pub fn get_perms(&self, domid: u32, tx: u32, path: &str) -> Result<Vec<Perm>> {
        let g = self.lock();
        g.check_tx(domid, tx)?;
        let path = Self::absolute(domid, path);
        let n = g.get(tx, &path).ok_or(StoreErrno::ENOENT)?;
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
        g.check_tx(domid, tx)?;
        let path = Self::absolute(domid, path);
        let n = g.get(tx, &path).ok_or(StoreErrno::ENOENT)?;
        if domid != 0 && (n.owner() != domid || u32::from(perms[0].domid.0) != domid) {
            return Err(StoreErrno::EACCES);
        }
        if tx != 0 && domid != 0 {
            g.room_for(domid, tx, 1)?;
        }
        let node = Node {
            perms: perms.to_vec(),
            ..n.clone()
        };
        let fired = node.clone();
        g.put(tx, &path, Some(node));
        if tx == 0 {
            g.fire(&path, &fired);
        }
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
            below: format!("{}/", path.trim_end_matches('/')),
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
            start_gen: g.generation,
            over: BTreeMap::new(),
        };
        g.txs.insert(id, tx);
        Ok(id)
    }

    /// Ends a transaction: applies it if `commit` and nothing it changed (nor the parent of a
    /// node it wrote) changed meanwhile, and the domain's quota still holds (else `EAGAIN` or
    /// `ENOSPC`, and nothing is applied).
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
        let r = if commit { g.commit(t) } else { Ok(()) };
        g.trim_tombstones();
        r
    }
}

impl Inner {
    /// `ENOENT` for a transaction that is not `domid`'s.
    fn check_tx(&self, domid: u32, tx: u32) -> Result<()> {
        match tx {
            0 => Ok(()),
            t if self.txs.get(&t).is_some_and(|t| t.domid == domid) => Ok(()),
            _ => Err(StoreErrno::ENOENT),
        }
    }

    /// A node as `tx` sees it (0: the live tree).
    fn get(&self, tx: u32, path: &str) -> Option<&Node> {
        if let Some(e) = self.txs.get(&tx).and_then(|t| t.over.get(path)) {
            return e.as_ref();
        }
        self.nodes.get(path)
    }

    /// Every path under `prefix` (which ends in `/`) as `tx` sees the tree.
    fn below(&self, tx: u32, prefix: &str) -> Vec<String> {
        let under = |k: &&String| k.starts_with(prefix);
        let mut seen: BTreeMap<&String, bool> = self
            .nodes
            .range(prefix.to_string()..)
            .map(|(k, _)| k)
            .take_while(under)
            .map(|k| (k, true))
            .collect();
        if let Some(t) = self.txs.get(&tx) {
            for (k, e) in t.over.range(prefix.to_string()..) {
                if !k.starts_with(prefix) {
                    break;
                }
                seen.insert(k, e.is_some());
            }
        }
        seen.into_iter()
            .filter(|&(_, live)| live)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Nodes `domid` owns, as `tx` sees the tree.
    fn owned_in(&self, domid: u32, tx: u32) -> usize {
        self.owned_with(domid, self.txs.get(&tx).map(|t| &t.over))
    }

    /// Nodes `domid` would own with the changes `over` applied to the live tree.
    fn owned_with(&self, domid: u32, over: Option<&BTreeMap<String, Option<Node>>>) -> usize {
        let mut n = self.owned.get(&domid).copied().unwrap_or(0) as i64;
        for (p, e) in over.into_iter().flatten() {
            let was = self.nodes.get(p).is_some_and(|o| o.owner() == domid);
            let is = e.as_ref().is_some_and(|o| o.owner() == domid);
            n += i64::from(is) - i64::from(was);
        }
        n.max(0) as usize
    }

    /// Whether `domid` may create `more` nodes (its quota) and, in a transaction, record `more`
    /// changes (a transaction holds at most its domain's node quota of changes).
    fn room_for(&self, domid: u32, tx: u32, more: usize) -> Result<()> {
        let quota = self.quota.nodes;
        if self.owned_in(domid, tx) + more > quota {
            return Err(StoreErrno::ENOSPC);
        }
        if self
            .txs
            .get(&tx)
            .is_some_and(|t| t.over.len() + more > quota)
        {
            return Err(StoreErrno::ENOSPC);
        }
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) a node, in `tx`'s overlay or (0) in the live tree.
    fn put(&mut self, tx: u32, path: &str, node: Option<Node>) {
        if let Some(t) = self.txs.get_mut(&tx) {
            t.over.insert(path.to_string(), node);
            return;
        }
        self.generation += 1;
        match node {
            Some(n) => self.put_live(path, n),
            None => self.remove_live(path),
        }
    }

    fn put_live(&mut self, path: &str, mut node: Node) {
        node.generation = self.generation;
        *self.owned.entry(node.owner()).or_default() += 1;
        if let Some(old) = self.nodes.insert(path.to_string(), node) {
            self.disown(old.owner());
        }
    }

    fn remove_live(&mut self, path: &str) {
        if let Some(old) = self.nodes.remove(path) {
            self.disown(old.owner());
            if !self.txs.is_empty() {
                self.tombstones.insert(path.to_string(), self.generation);
                if self.tombstones.len() > MAX_TOMBSTONES {
                    self.tombstones.clear();
                    self.tombstone_floor = self.generation;
                }
            }
        }
    }

    /// Removes `domid` from every permission list; nodes it owned become dom0's. Generations are
    /// left alone: nothing a transaction could conflict with changed, and open transactions'
    /// copies are cleaned the same way, so a commit cannot bring the id back.
    fn forget_perms(&mut self, domid: u32) {
        let id = DomId(domid as u16);
        let mut passed = 0;
        for n in self.nodes.values_mut() {
            passed += usize::from(forget_in(&mut n.perms, id));
        }
        for t in self.txs.values_mut() {
            for n in t.over.values_mut().flatten() {
                forget_in(&mut n.perms, id);
            }
        }
        self.owned.remove(&domid);
        if passed > 0 {
            *self.owned.entry(0).or_default() += passed;
        }
    }

    fn disown(&mut self, owner: u32) {
        if let Some(c) = self.owned.get_mut(&owner) {
            *c = c.saturating_sub(1);
        }
    }

    /// Whether `path` changed after generation `since` (written, created or removed).
    fn changed_since(&self, path: &str, since: u64) -> bool {
        self.nodes.get(path).is_some_and(|n| n.generation > since)
            || self.tombstones.get(path).is_some_and(|&g| g > since)
    }

    fn commit(&mut self, t: Tx) -> Result<()> {
        let conflict = t.start_gen < self.tombstone_floor
            || t.over.iter().any(|(p, e)| {
                self.changed_since(p, t.start_gen)
                    || (e.is_some()
                        && parent(p).is_some_and(|pp| self.changed_since(pp, t.start_gen)))
            });
        if conflict {
            return Err(StoreErrno::EAGAIN);
        }
        // The quota again: other transactions of the domain may have committed meanwhile.
        if t.domid != 0 && self.owned_with(t.domid, Some(&t.over)) > self.quota.nodes {
            return Err(StoreErrno::ENOSPC);
        }
        // A removed parent takes its live children along (they are in the overlay only when the
        // transaction saw them, and it saw the tree as it was).
        for (p, e) in t.over {
            let before = self.nodes.get(&p).cloned();
            if e.is_none() {
                for k in self.below(0, &format!("{p}/")) {
                    self.put(0, &k, None);
                }
            }
            self.put(0, &p, e.clone());
            if let Some(n) = e.or(before) {
                self.fire(&p, &n);
            }
        }
        Ok(())
    }

    /// Forgets tombstones no open transaction can need.
    fn trim_tombstones(&mut self) {
        match self.txs.values().map(|t| t.start_gen).min() {
            None => self.tombstones.clear(),
            Some(oldest) => self.tombstones.retain(|_, g| *g > oldest),
        }
    }

    /// Queues watch events for a change to `path` whose node (after a write, before a removal)
    /// is `node`: watches on the path, its ancestors and (for a removal) its descendants fire,
    /// for domains that may read the node.
    fn fire(&mut self, path: &str, node: &Node) {
        let below = format!("{path}/");
        let hits: Vec<(u32, String)> = self
            .watches
            .iter()
            .filter(|w| path == w.path || path.starts_with(&w.below) || w.path.starts_with(&below))
            .filter(|w| can(w.domid, node, PermKind::Read))
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
    fn transactions_hold_only_their_changes_and_the_quota_holds_at_commit() {
        let s = Store::new(Quota {
            nodes: 20,
            ..Quota::default()
        });
        s.introduce(2, "two", Box::new(|| {}));
        let owned = |s: &Store| s.lock().owned.get(&2).copied().unwrap_or(0);
        let base = owned(&s);
        // Two transactions each fit the quota alone; together they would not.
        let (t1, t2) = (
            s.transaction_start(2).unwrap(),
            s.transaction_start(2).unwrap(),
        );
        for i in 0..12 {
            s.write(2, t1, &format!("a{i}"), b"x").unwrap();
            s.write(2, t2, &format!("b{i}"), b"x").unwrap();
        }
        assert_eq!(s.lock().txs[&t1].over.len(), 12, "an overlay, not a copy");
        s.transaction_end(2, t1, true).unwrap();
        assert_eq!(s.transaction_end(2, t2, true), Err(StoreErrno::ENOSPC));
        assert_eq!(owned(&s), base + 12);
        // A transaction cannot pile up more changes than the quota, even by write/rm.
        let t = s.transaction_start(2).unwrap();
        let err = (0..100)
            .find_map(|i| {
                let p = format!("c{i}");
                s.write(2, t, &p, b"x").and_then(|()| s.rm(2, t, &p)).err()
            })
            .unwrap();
        assert_eq!(err, StoreErrno::ENOSPC);
        s.transaction_end(2, t, false).unwrap();
    }

    #[test]
    fn commits_see_removed_parents_and_removals_outside_transactions_leave_nothing_behind() {
        let s = store();
        s.write(2, 0, "dir/x", b"1").unwrap();
        // The parent goes while a transaction writes below it: the commit is refused.
        let t = s.transaction_start(2).unwrap();
        s.write(2, t, "dir/y", b"2").unwrap();
        s.rm(2, 0, "dir").unwrap();
        assert_eq!(s.transaction_end(2, t, true), Err(StoreErrno::EAGAIN));
        assert_eq!(s.read(2, 0, "dir/y"), Err(StoreErrno::ENOENT));
        // A transaction removing a subtree also removes what was added below it meanwhile.
        s.write(2, 0, "dir/x", b"1").unwrap();
        let t = s.transaction_start(2).unwrap();
        s.rm(2, t, "dir").unwrap();
        s.write(2, 0, "dir/late", b"3").unwrap();
        s.transaction_end(2, t, true).unwrap();
        assert_eq!(
            s.directory(2, 0, "/local/domain/2"),
            Ok(vec!["domid".into(), "name".into()])
        );
        // With no transaction open, write/rm loops leave no bookkeeping.
        for i in 0..100 {
            s.write(2, 0, &format!("tmp{i}"), b"x").unwrap();
            s.rm(2, 0, &format!("tmp{i}")).unwrap();
        }
        assert!(s.lock().tombstones.is_empty());
    }

    #[test]
    fn a_removal_is_not_announced_to_a_domain_that_could_not_read_the_node() {
        let s = store();
        s.write(3, 0, "secret/x", b"1").unwrap();
        // Domain 2 watches a path it cannot read inside domain 3's home.
        s.watch(2, "/local/domain/3/secret/x", "spy").unwrap();
        while s.next_event(2).is_some() {}
        s.rm(3, 0, "secret").unwrap();
        assert_eq!(s.next_event(2), None);
    }

    fn both(domid: u32) -> Perm {
        perm(PermKind::Both, domid)
    }

    /// Domain 2 as a toolstack leaves it: a node it created in a directory dom0 let it write
    /// (owned by 2, outside its home), and a node of domain 3's that 3 let it read.
    fn store_with_traces_of_two(quota: Quota) -> Store {
        let s = Store::new(quota);
        s.introduce(2, "two", Box::new(|| {}));
        s.introduce(3, "three", Box::new(|| {}));
        let dir = "/local/domain/0/backend/x";
        s.write(0, 0, dir, b"").unwrap();
        s.set_perms(0, 0, dir, &[perm(PermKind::None, 0), both(2)])
            .unwrap();
        s.write(2, 0, &format!("{dir}/mine"), b"old two's").unwrap();
        s.write(3, 0, "shared", b"for two").unwrap();
        s.set_perms(
            3,
            0,
            "shared",
            &[perm(PermKind::None, 3), perm(PermKind::Read, 2)],
        )
        .unwrap();
        s
    }

    #[test]
    fn a_reused_domain_id_inherits_no_node_and_no_permission() {
        let s = store_with_traces_of_two(Quota::default());
        s.release(2);
        s.introduce(2, "new two", Box::new(|| {}));
        let dir = "/local/domain/0/backend/x";
        assert_eq!(
            s.read(2, 0, &format!("{dir}/mine")),
            Err(StoreErrno::EACCES)
        );
        assert_eq!(
            s.write(2, 0, &format!("{dir}/new"), b""),
            Err(StoreErrno::EACCES)
        );
        assert_eq!(
            s.read(2, 0, "/local/domain/3/shared"),
            Err(StoreErrno::EACCES)
        );
        // What the old domain owned outside its home is dom0's now (as Xen's xenstored does);
        // the permissions that named it are gone.
        assert_eq!(
            s.get_perms(0, 0, &format!("{dir}/mine")).unwrap()[0].domid,
            DomId(0)
        );
        assert_eq!(s.get_perms(0, 0, dir).unwrap(), [perm(PermKind::None, 0)]);
        assert_eq!(
            s.get_perms(0, 0, "/local/domain/3/shared").unwrap(),
            [perm(PermKind::None, 3)]
        );
    }

    #[test]
    fn a_reused_domain_id_starts_with_its_whole_node_quota() {
        // Home, name and domid are the domain's three; three more fill the quota.
        let quota = Quota {
            nodes: 6,
            ..Quota::default()
        };
        let s = store_with_traces_of_two(quota);
        for n in ["a", "b"] {
            s.write(2, 0, &format!("/local/domain/0/backend/x/{n}"), b"")
                .unwrap();
        }
        assert_eq!(s.write(2, 0, "full", b""), Err(StoreErrno::ENOSPC));
        s.release(2);
        s.introduce(2, "new two", Box::new(|| {}));
        for n in ["a", "b", "c"] {
            s.write(2, 0, n, b"").unwrap();
        }
        assert_eq!(s.write(2, 0, "full", b""), Err(StoreErrno::ENOSPC));
    }

    #[test]
    fn a_transaction_open_across_a_release_cannot_restore_the_released_domain() {
        let s = store();
        let tx = s.transaction_start(3).unwrap();
        s.write(3, tx, "later", b"for two").unwrap();
        s.set_perms(3, tx, "later", &[perm(PermKind::None, 3), both(2)])
            .unwrap();
        s.release(2);
        s.introduce(2, "new two", Box::new(|| {}));
        s.transaction_end(3, tx, true).unwrap();
        assert_eq!(
            s.read(2, 0, "/local/domain/3/later"),
            Err(StoreErrno::EACCES)
        );
        assert_eq!(
            s.get_perms(3, 0, "later").unwrap(),
            [perm(PermKind::None, 3)]
        );
    }

    #[test]
    fn introduce_starts_from_an_empty_home() {
        let s = store();
        s.release(2);
        // A back end of the old domain that wrote once more after it was released.
        s.write(0, 0, "/local/domain/2/device/vif/0/state", b"6")
            .unwrap();
        s.introduce(2, "new two", Box::new(|| {}));
        assert_eq!(
            s.read(0, 0, "/local/domain/2/device"),
            Err(StoreErrno::ENOENT)
        );
        assert_eq!(
            s.directory(2, 0, "/local/domain/2").unwrap(),
            ["domid", "name"]
        );
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
