//! The config store: a xenstore-like tree of nodes with permissions, watches, transactions and
//! per-domain quotas.
//!
//! Paths are Xen's: absolute (`/local/domain/3/device/vbd/0/state`) or relative to the caller's
//! home `/local/domain/<id>`. Each node carries a permission list: the first entry names the
//! owner and the access everyone else gets; later entries grant access to specific domains. Dom0
//! may do anything; the owner may do anything to its node. A domain's home is owned by dom0 and
//! open to the guest through its ACL, as Xen's toolstack makes it: the guest works in it but
//! cannot remove it or change its permissions. Guests reach the store through the `pvdev` ring
//! server; dom0 calls this API directly.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Bound;
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
    /// Bytes in one watch token (each event carries it).
    pub watch_token_bytes: usize,
    /// Bytes of path and token over all of a domain's watches (as xenstored's memory quota
    /// counts them).
    pub watch_bytes: usize,
    /// Transactions a domain may have open.
    pub transactions: usize,
    /// Node changes one transaction may make: every write, removal or permission change of a
    /// node counts, also of one it changed before (a transaction's work is bounded, not only
    /// the nodes it creates).
    pub transaction_edits: usize,
    /// Watch events queued for a domain (dom0 too) that does not read them; what does not fit
    /// is merged into one event per watch, naming the watched path, delivered after the queue.
    pub queued_events: usize,
    /// Bytes of path and token in a domain's queued events (the same overflow).
    pub queued_event_bytes: usize,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            nodes: 1000,
            value_bytes: 2048,
            watches: 128,
            // Linux names a watch by a pointer in hex (16 bytes); 16 times that is plenty.
            watch_token_bytes: 256,
            // 128 watches of typical back-end paths (~60 bytes) and tokens fit three times over.
            watch_bytes: 32 * 1024,
            transactions: 10,
            // Xen's transaction-nodes quota; Linux's xenbus transactions make a handful.
            transaction_edits: 1024,
            queued_events: 1024,
            // 1024 events of typical paths; long paths fill it with fewer.
            queued_event_bytes: 128 * 1024,
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
    /// Generation of the last removal of a child of this node: a transaction's conflict check
    /// learns from it that a path below, now missing, may have existed (no record per removed
    /// path is kept, so removals cost no memory).
    child_removed: u64,
}

impl Node {
    fn owner(&self) -> u32 {
        self.perms.first().map_or(0, |p| u32::from(p.domid.0))
    }
}

/// A watch event as queued: `(path, token)`, both shared.
type Event = (Arc<str>, Arc<str>);

/// A domain's queued watch events.
#[derive(Debug, Default)]
struct EventQueue {
    queue: VecDeque<Event>,
    /// Path and token bytes in `queue`.
    bytes: usize,
    /// Watches `(path, token)` that had an event the queue had no room for, each once, in the
    /// order they overflowed. Each is delivered, once `queue` is empty, as one event naming the
    /// watched path: like the event at registration, it tells the client to re-read what it
    /// watches, so no change goes unannounced. While any wait, new events join them, so the
    /// merged events come after everything they stand for.
    lost: VecDeque<Event>,
    lost_set: HashSet<Event>,
}

impl EventQueue {
    fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.lost.is_empty()
    }

    fn forget_watch(&mut self, path: &str, token: &str) {
        let key: Event = (Arc::from(path), Arc::from(token));
        if self.lost_set.remove(&key) {
            self.lost.retain(|w| *w != key);
        }
    }
}

/// Every watch, indexed by the watched path: a change looks up its own path and those of its
/// ancestors (and for a removal, the range below it), never every watch. Paths and tokens are
/// shared (`Arc<str>`) with the events that name them, so firing copies no string.
#[derive(Debug, Default)]
struct Watches {
    /// Watched path -> watching domain -> its tokens on that path.
    by_path: BTreeMap<Arc<str>, BTreeMap<u32, Vec<Arc<str>>>>,
    /// How many watched paths have each length: the only prefixes of a changed path worth
    /// looking up (a deep path costs one lookup per length in use, not per ancestor).
    lens: BTreeMap<usize, usize>,
    /// Each domain's watches (path, token) and their bytes: the quotas, without a scan.
    by_dom: HashMap<u32, (Vec<Event>, usize)>,
}

impl Watches {
    fn holds(&self, domid: u32, path: &str, token: &str) -> bool {
        self.by_path
            .get(path)
            .and_then(|g| g.get(&domid))
            .is_some_and(|ts| ts.iter().any(|t| **t == *token))
    }

    /// Adds a watch (not held yet); returns its shared path and token.
    fn add(&mut self, domid: u32, path: &str, token: &str) -> (Arc<str>, Arc<str>) {
        let (path, token) = self.index(domid, path, token);
        let (list, bytes) = self.by_dom.entry(domid).or_default();
        *bytes += path.len() + token.len();
        list.push((Arc::clone(&path), Arc::clone(&token)));
        (path, token)
    }

    /// Puts a watch in the path index only (not in `by_dom`: dom0's in-process watches, which
    /// no quota counts and which go one by one, never with a domain).
    fn index(&mut self, domid: u32, path: &str, token: &str) -> (Arc<str>, Arc<str>) {
        let token: Arc<str> = Arc::from(token);
        let path = match self.by_path.get_key_value(path) {
            Some((p, _)) => Arc::clone(p),
            None => {
                *self.lens.entry(path.len()).or_default() += 1;
                Arc::from(path)
            }
        };
        let group = self.by_path.entry(Arc::clone(&path)).or_default();
        group.entry(domid).or_default().push(Arc::clone(&token));
        (path, token)
    }

    /// Removes one watch; whether it was held.
    fn remove(&mut self, domid: u32, path: &str, token: &str) -> bool {
        if !self.unindex(domid, path, token) {
            return false;
        }
        if let Some((list, bytes)) = self.by_dom.get_mut(&domid) {
            list.retain(|(p, t)| !(**p == *path && **t == *token));
            *bytes = bytes.saturating_sub(path.len() + token.len());
        }
        true
    }

    /// Takes a watch out of the path index; whether it was there.
    fn unindex(&mut self, domid: u32, path: &str, token: &str) -> bool {
        let Some(group) = self.by_path.get_mut(path) else {
            return false;
        };
        let Some(tokens) = group.get_mut(&domid) else {
            return false;
        };
        let Some(i) = tokens.iter().position(|t| **t == *token) else {
            return false;
        };
        tokens.swap_remove(i);
        if tokens.is_empty() {
            group.remove(&domid);
        }
        if group.is_empty() {
            self.by_path.remove(path);
            if let Some(n) = self.lens.get_mut(&path.len()) {
                *n -= 1;
                if *n == 0 {
                    self.lens.remove(&path.len());
                }
            }
        }
        true
    }

    /// `(watches, bytes)` a domain holds.
    fn usage(&self, domid: u32) -> (usize, usize) {
        self.by_dom
            .get(&domid)
            .map_or((0, 0), |(list, bytes)| (list.len(), *bytes))
    }

    fn remove_domain(&mut self, domid: u32) {
        let (list, _) = self.by_dom.remove(&domid).unwrap_or_default();
        for (p, t) in list {
            self.remove(domid, &p, &t);
        }
    }
}

/// An open transaction: only what it changed (an overlay on the live tree, `None` = removed),
/// never a copy of the store.
#[derive(Debug)]
struct Tx {
    domid: u32,
    start_gen: u64,
    over: BTreeMap<String, Option<Node>>,
    /// Node changes made so far (the `transaction_edits` quota).
    edits: usize,
    /// Nodes of `domid` the changes add (negative: remove), kept as they are made so the node
    /// quota is checked without a pass over the overlay; the commit counts exactly.
    owned_delta: i64,
}

/// Called when a domain has new watch events queued, or (for [`Store::watch_local`]) when a
/// watched path changed. It runs with the store's lock held: it must not call the store, and
/// should only signal (write an eventfd, notify a condition variable whose waiters never hold
/// its mutex while they call the store).
pub type Wake = Box<dyn Fn() + Send + Sync>;

/// Tokens of dom0's in-process watches start with a NUL, which no token from a ring can hold
/// (the wire's strings end at their first NUL).
const LOCAL_TOKEN: char = '\0';

/// A watch of dom0's own, in this process ([`Store::watch_local`]): its callback is called for
/// every change at or below the watched path, and the watch goes when this is dropped.
pub struct LocalWatch {
    store: Arc<Store>,
    path: Arc<str>,
    token: Arc<str>,
}

impl std::fmt::Debug for LocalWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWatch")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Drop for LocalWatch {
    fn drop(&mut self) {
        let mut g = self.store.lock();
        g.watches.unindex(0, &self.path, &self.token);
        g.local.remove(&self.token);
    }
}

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<String, Node>,
    /// Nodes each domain owns (the quota counts them).
    owned: HashMap<u32, usize>,
    generation: u64,
    watches: Watches,
    txs: HashMap<u32, Tx>,
    /// Transactions each domain has open (the quota; no scan).
    open_txs: HashMap<u32, usize>,
    next_tx: u32,
    events: HashMap<u32, EventQueue>,
    /// Each introduced domain's waker: a domain is introduced from `introduce` to `release`.
    wakers: HashMap<u32, Arc<Wake>>,
    /// dom0's in-process watches, by token: called at once instead of queuing an event.
    local: HashMap<Arc<str>, Wake>,
    /// Numbers the tokens of in-process watches.
    next_local: u64,
    /// Ids that some node's permissions (live, or in an open transaction) named while no
    /// domain with the id was introduced: `introduce` forgets them before a new domain gets the
    /// id, and introducing any other id needs no pass over the store. At most one entry per
    /// 16-bit id.
    named_absent: HashSet<u32>,
    quota: Quota,
    /// Units of work done under the lock, by kind, for tests that bound it.
    #[cfg(test)]
    steps: [std::cell::Cell<u64>; 5],
}

/// Kinds of work counted under the lock (see `Inner::step`).
#[derive(Debug, Clone, Copy)]
enum Work {
    /// A watch (or one domain's watches on a path) looked at for a change.
    Watch,
    /// A transaction change or open transaction counted.
    Count,
    /// A seek in a directory listing.
    Seek,
    /// A lookup for the nearest existing ancestor.
    Probe,
    /// A node or transaction change looked at for permissions naming a released domain.
    Scrub,
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

/// Whether `path` is some domain's home `/local/domain/<id>`: only dom0 removes one (a guest
/// has write access to its own, which would otherwise let it remove it).
fn is_home(path: &str) -> bool {
    path.strip_prefix("/local/domain/")
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|c| c.is_ascii_digit()))
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
    if perms.iter().skip(1).any(|p| p.domid == id) {
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
                    child_removed: 0,
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

    /// Prepares a domain's home as Xen's toolstack does: `/local/domain/<id>` owned by dom0 (so
    /// the guest can neither remove it nor change its permissions), read/write for the guest
    /// through its ACL and hidden from everyone else; `name` and `domid` written by dom0 and only
    /// readable by the guest. `wake` is called when watch events are queued.
    ///
    /// Domain ids are reused, so the new domain starts from nothing: a home left behind (a back
    /// end that wrote once more after the last domain with the id was released) is removed, and
    /// if anything named the id in its permissions since then, that is forgotten first, as in
    /// [`release`](Self::release). An id nothing named costs no pass over the store.
    pub fn introduce(&self, domid: u32, name: &str, wake: Wake) {
        let h = home(domid);
        let mut g = self.lock();
        if domid != 0 {
            let scrub = g.named_absent.contains(&domid);
            g.forget_domain(domid, scrub);
        }
        g.wakers.insert(domid, Arc::new(wake));
        drop(g);
        let _ = self.write(0, 0, &h, b"");
        let rw = [perm(PermKind::None, 0), perm(PermKind::Both, domid)];
        let _ = self.set_perms(0, 0, &h, &rw);
        let ro = [perm(PermKind::None, 0), perm(PermKind::Read, domid)];
        for (k, v) in [("name", name.to_string()), ("domid", domid.to_string())] {
            let p = format!("{h}/{k}");
            let _ = self.write(0, 0, &p, v.as_bytes());
            let _ = self.set_perms(0, 0, &p, &ro);
        }
    }

    /// Forgets a domain: its home subtree, watches, transactions and queued events, and every
    /// trace of its id elsewhere, so that a later domain given the same id inherits nothing
    /// (Xen's XSA-322): nodes it owned outside its home pass to dom0 (and count as dom0's), and
    /// permission entries naming it are dropped, in the live tree and in other domains' open
    /// transactions.
    ///
    /// The cost: the domain's own watches, transactions and home subtree, plus one pass over
    /// every node of the store and every open transaction's changes to find the entries naming
    /// it (as xenstored walks its whole tree); never a pass per node or per watch.
    pub fn release(&self, domid: u32) {
        if domid == 0 {
            return;
        }
        self.lock().forget_domain(domid, true);
    }

    /// Takes the next queued watch event `(path, token)` for `domid`.
    pub fn next_event(&self, domid: u32) -> Option<(Arc<str>, Arc<str>)> {
        let mut g = self.lock();
        let q = g.events.get_mut(&domid)?;
        if let Some(ev) = q.queue.pop_front() {
            q.bytes = q.bytes.saturating_sub(ev.0.len() + ev.1.len());
            return Some(ev);
        }
        let w = q.lost.pop_front()?;
        q.lost_set.remove(&w);
        Some(w)
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
        // Children only, never their subtrees: a listing costs what it returns.
        let mut names: BTreeMap<&str, bool> = BTreeMap::new();
        g.each_child(&g.nodes, &prefix, |name, _| {
            names.insert(name, true);
        });
        if let Some(t) = g.txs.get(&tx) {
            g.each_child(&t.over, &prefix, |name, e| {
                names.insert(name, e.is_some());
            });
        }
        Ok(names
            .into_iter()
            .filter(|&(_, live)| live)
            .map(|(n, _)| n.to_string())
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
                if domid != 0 {
                    g.edits_room(tx, 1)?;
                }
                Node {
                    value: value.to_vec(),
                    ..n.clone()
                }
            }
            None => {
                let (base, missing) = g.nearest_ancestor(tx, &path).ok_or(StoreErrno::ENOENT)?;
                let base = base.clone();
                let missing: Vec<String> = missing.iter().map(|m| m.to_string()).collect();
                if !can(domid, &base, PermKind::Write) {
                    return Err(StoreErrno::EACCES);
                }
                // The missing ancestors and the node itself.
                if domid != 0 {
                    g.nodes_room(domid, tx, missing.len() + 1)?;
                    g.edits_room(tx, missing.len() + 1)?;
                }
                let mut perms = base.perms.clone();
                if let Some(first) = perms.first_mut().filter(|_| domid != 0) {
                    first.domid = DomId(domid as u16);
                }
                let fresh = |value: Vec<u8>| Node {
                    value,
                    perms: perms.clone(),
                    generation: 0,
                    child_removed: 0,
                };
                // Parents first; the node itself below.
                for m in &missing {
                    g.put(tx, m, Some(fresh(Vec::new())));
                }
                fresh(value.to_vec())
            }
        };
        let fired = node.clone();
        g.put(tx, &path, Some(node));
        if tx == 0 {
            g.fire(&path, &fired, false);
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
        if !can(domid, &n, PermKind::Write) || (domid != 0 && is_home(&path)) {
            return Err(StoreErrno::EACCES);
        }
        let doomed = g.below(tx, &format!("{path}/"));
        if domid != 0 {
            g.edits_room(tx, doomed.len() + 1)?;
        }
        g.remove_tree(tx, &path, &n, &doomed);
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
        if domid != 0 {
            g.edits_room(tx, 1)?;
        }
        let node = Node {
            perms: perms.to_vec(),
            ..n.clone()
        };
        let fired = node.clone();
        g.put(tx, &path, Some(node));
        if tx == 0 {
            g.fire(&path, &fired, false);
        }
        Ok(())
    }

    /// Registers a watch; like Xen, it fires once at once.
    pub fn watch(&self, domid: u32, path: &str, token: &str) -> Result<()> {
        let mut g = self.lock();
        if domid != 0 && token.len() > g.quota.watch_token_bytes {
            return Err(StoreErrno::E2BIG);
        }
        let path = Self::absolute(domid, path);
        let bytes = path.len() + token.len();
        let (held, used) = g.watches.usage(domid);
        if domid != 0 && (held >= g.quota.watches || used + bytes > g.quota.watch_bytes) {
            return Err(StoreErrno::ENOSPC);
        }
        if g.watches.holds(domid, &path, token) {
            return Err(StoreErrno::EEXIST);
        }
        let (path, token) = g.watches.add(domid, &path, token);
        g.queue_event(domid, &path, &path, &token);
        Ok(())
    }

    /// Watches `path` (absolute, or relative to dom0's home) for dom0, in this process: `wake`
    /// is called (with the store's lock held, see [`Wake`]) once at once, as a watch fires at
    /// registration, and then for every change at or below the path, including its removal or
    /// the removal of an ancestor, and for nothing else. No event is queued; the caller reads
    /// what it needs. Costs one entry in the watch index, until the returned watch is dropped.
    pub fn watch_local(self: &Arc<Self>, path: &str, wake: Wake) -> LocalWatch {
        let path = Self::absolute(0, path);
        let mut g = self.lock();
        g.next_local += 1;
        let token = format!("{LOCAL_TOKEN}local-{}", g.next_local);
        let (path, token) = g.watches.index(0, &path, &token);
        wake();
        g.local.insert(Arc::clone(&token), wake);
        LocalWatch {
            store: Arc::clone(self),
            path,
            token,
        }
    }

    /// Removes a watch.
    pub fn unwatch(&self, domid: u32, path: &str, token: &str) -> Result<()> {
        let mut g = self.lock();
        let path = Self::absolute(domid, path);
        if !g.watches.remove(domid, &path, token) {
            return Err(StoreErrno::ENOENT);
        }
        // A merged event for it would name a watch the domain no longer holds (and such
        // entries could pile up beyond the watch quota).
        if let Some(q) = g.events.get_mut(&domid) {
            q.forget_watch(&path, token);
        }
        Ok(())
    }

    /// Starts a transaction; returns its id.
    pub fn transaction_start(&self, domid: u32) -> Result<u32> {
        let mut g = self.lock();
        let open = g.open_txs.get(&domid).copied().unwrap_or(0);
        if domid != 0 && open >= g.quota.transactions {
            return Err(StoreErrno::ENOSPC);
        }
        // Ids wrap; one still open (anyone's) is skipped, and 0 means "no transaction". The
        // loop ends because some id is free.
        if g.txs.len() >= u32::MAX as usize - 1 {
            return Err(StoreErrno::ENOSPC);
        }
        let mut id = g.next_tx;
        while id == 0 || g.txs.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        g.next_tx = id.wrapping_add(1);
        let tx = Tx {
            domid,
            start_gen: g.generation,
            over: BTreeMap::new(),
            edits: 0,
            owned_delta: 0,
        };
        g.txs.insert(id, tx);
        *g.open_txs.entry(domid).or_default() += 1;
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
        if let Some(n) = g.open_txs.get_mut(&domid) {
            *n = n.saturating_sub(1);
        }
        if commit { g.commit(t) } else { Ok(()) }
    }
}

impl Inner {
    /// Counts one unit of work (tests assert on the count, not on time).
    fn step(&self, kind: Work) {
        self.steps(kind, 1);
    }

    /// Counts `n` units of work.
    fn steps(&self, _kind: Work, _n: u64) {
        #[cfg(test)]
        {
            let c = &self.steps[_kind as usize];
            c.set(c.get() + _n);
        }
    }

    /// The nearest ancestor of `path` (which `tx` does not see) that `tx` sees, with the
    /// ancestors below it, all missing, shallowest first. A node never exists without its
    /// parent, so existence along the path flips once and bisecting finds it: a few lookups,
    /// not one per level of a 1500-level path. (A transaction that removed a node can see a
    /// child created since, live; any answer then is below an existing node, and the commit is
    /// refused anyway, since that child changed after the transaction started.)
    fn nearest_ancestor<'p>(&self, tx: u32, path: &'p str) -> Option<(&Node, Vec<&'p str>)> {
        let ends: Vec<usize> = std::iter::once(1)
            .filter(|_| path.len() > 1 && path.starts_with('/'))
            .chain(path.match_indices('/').map(|(i, _)| i).filter(|&i| i > 0))
            .collect();
        let ancestor = |i: usize| &path[..ends[i]];
        // Invariant: `ancestor(lo - 1)` exists (or lo == 0), `ancestor(hi)` does not (or
        // hi == ends.len()).
        let (mut lo, mut hi) = (0, ends.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            self.step(Work::Probe);
            if self.get(tx, ancestor(mid)).is_some() {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let base = self.get(tx, ancestor(lo.checked_sub(1)?))?;
        Some((base, (lo..ends.len()).map(ancestor).collect()))
    }

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

    /// Calls `f(name, value)` for each key of `map` that is a child of `prefix` (which ends in
    /// `/`), in order; seeks past each child's subtree, so the cost is a few lookups per child
    /// whatever lies below them.
    fn each_child<'m, V>(
        &self,
        map: &'m BTreeMap<String, V>,
        prefix: &str,
        mut f: impl FnMut(&'m str, &'m V),
    ) {
        let mut skip_to: Option<String> = None;
        let mut after: Option<&'m str> = None;
        loop {
            self.step(Work::Seek);
            let from = match (&skip_to, after) {
                (Some(k), _) => Bound::Included(k.as_str()),
                (None, Some(k)) => Bound::Excluded(k),
                (None, None) => Bound::Included(prefix),
            };
            let Some((k, v)) = map.range::<str, _>((from, Bound::Unbounded)).next() else {
                return;
            };
            let Some(rest) = k.strip_prefix(prefix) else {
                return;
            };
            match rest.find('/') {
                None => {
                    // "" is the root itself, under the prefix "/".
                    if !rest.is_empty() {
                        f(rest, v);
                    }
                    (skip_to, after) = (None, Some(k.as_str()));
                }
                // Below child `rest[..i]` (listed already, or absent from `map`): jump past
                // `<child>/...`, to the first key after `<child>` + '/', that is `<child>0`.
                Some(i) => skip_to = Some(format!("{prefix}{}0", &rest[..i])),
            }
        }
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

    /// Nodes `domid` owns, as `tx` (one of `domid`'s, or 0) sees the tree.
    fn owned_in(&self, domid: u32, tx: u32) -> usize {
        let live = self.owned.get(&domid).copied().unwrap_or(0) as i64;
        let delta = self.txs.get(&tx).map_or(0, |t| t.owned_delta);
        (live + delta).max(0) as usize
    }

    /// Nodes `domid` would own with the changes `over` applied to the live tree.
    fn owned_with(&self, domid: u32, over: Option<&BTreeMap<String, Option<Node>>>) -> usize {
        let mut n = self.owned.get(&domid).copied().unwrap_or(0) as i64;
        for (p, e) in over.into_iter().flatten() {
            self.step(Work::Count);
            let was = self.nodes.get(p).is_some_and(|o| o.owner() == domid);
            let is = e.as_ref().is_some_and(|o| o.owner() == domid);
            n += i64::from(is) - i64::from(was);
        }
        n.max(0) as usize
    }

    /// Whether `domid` may create `more` nodes (its quota), as `tx` sees the tree.
    fn nodes_room(&self, domid: u32, tx: u32, more: usize) -> Result<()> {
        if self.owned_in(domid, tx) + more > self.quota.nodes {
            return Err(StoreErrno::ENOSPC);
        }
        Ok(())
    }

    /// Whether transaction `tx` (if one: 0 is the live tree) may make `more` node changes.
    fn edits_room(&self, tx: u32, more: usize) -> Result<()> {
        if self
            .txs
            .get(&tx)
            .is_some_and(|t| t.edits + more > self.quota.transaction_edits)
        {
            return Err(StoreErrno::ENOSPC);
        }
        Ok(())
    }

    /// Removes `path` (whose node `tx` sees as `node`) and `doomed`, every path below it.
    fn remove_tree(&mut self, tx: u32, path: &str, node: &Node, doomed: &[String]) {
        for k in doomed
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(path))
        {
            self.put(tx, k, None);
        }
        if tx == 0 {
            // Watchers learn of the removal if they could read the node it removed.
            self.fire(path, node, true);
        }
    }

    /// Forgets domain `domid` (not dom0): its watches, transactions, queued events, waker and
    /// home subtree; with `scrub`, also every permission entry naming it ([`Self::forget_perms`]).
    /// Without, the cost is the domain's own: its watches, and its home's nodes.
    fn forget_domain(&mut self, domid: u32, scrub: bool) {
        if domid == 0 {
            return;
        }
        // Its watches and queue go first: the removal of its home is news to others only.
        self.watches.remove_domain(domid);
        if self.open_txs.remove(&domid).is_some_and(|n| n > 0) {
            self.txs.retain(|_, t| t.domid != domid);
        }
        self.events.remove(&domid);
        self.wakers.remove(&domid);
        let h = home(domid);
        if let Some(n) = self.nodes.get(&h).cloned() {
            let doomed = self.below(0, &format!("{h}/"));
            self.remove_tree(0, &h, &n, &doomed);
        }
        if scrub {
            self.forget_perms(domid);
        }
    }

    /// Removes `domid` from every permission list, in the live tree and in open transactions'
    /// changes (so no commit brings it back); nodes it owned become dom0's, in the node counts
    /// too. One step per node and per transaction change: the entries naming a domain are kept
    /// in no index (one would cost a copy of each path per named domain on every write).
    ///
    /// Generations are left alone: no transaction is failed for it, and none needs to be, as
    /// its own copies are cleaned the same way. Nothing is announced: the entries named a
    /// domain that is gone, and everyone else's access is what it was.
    fn forget_perms(&mut self, domid: u32) {
        let id = DomId(domid as u16);
        let mut looked = 0;
        // Transactions first, while the live tree still shows what the domain owned. Each keeps
        // the change it makes to its own domain's node count, relative to the live tree; a node
        // passing to dom0 moves that only for dom0's transactions (the released domain's are
        // gone): one more if it passes in the transaction's changes, one fewer if in the live
        // tree under them.
        for t in self.txs.values_mut() {
            let mut delta = 0;
            for (p, e) in &mut t.over {
                looked += 1;
                let over = e.as_mut().is_some_and(|n| forget_in(&mut n.perms, id));
                let live = self.nodes.get(p).is_some_and(|n| n.owner() == domid);
                delta += i64::from(over) - i64::from(live);
            }
            if t.domid == 0 {
                t.owned_delta += delta;
            }
        }
        let mut passed = 0;
        for n in self.nodes.values_mut() {
            looked += 1;
            passed += usize::from(forget_in(&mut n.perms, id));
        }
        self.steps(Work::Scrub, looked);
        self.owned.remove(&domid);
        if passed > 0 {
            *self.owned.entry(0).or_default() += passed;
        }
        self.named_absent.remove(&domid);
    }

    /// Sets (`Some`) or removes (`None`) a node, in `tx`'s overlay or (0) in the live tree.
    fn put(&mut self, tx: u32, path: &str, node: Option<Node>) {
        if let Some(n) = &node {
            // Names of domains that are not there are remembered for `introduce`.
            for p in &n.perms {
                let d = u32::from(p.domid.0);
                if d != 0 && !self.wakers.contains_key(&d) {
                    self.named_absent.insert(d);
                }
            }
        }
        if let Some(t) = self.txs.get_mut(&tx) {
            let mine = |n: Option<&Node>| i64::from(n.is_some_and(|n| n.owner() == t.domid));
            let before = match t.over.get(path) {
                Some(e) => mine(e.as_ref()),
                None => mine(self.nodes.get(path)),
            };
            t.owned_delta += mine(node.as_ref()) - before;
            t.edits += 1;
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
        if let Some(old) = self.nodes.get_mut(path) {
            // A transaction's copy of the node may predate later removals below it.
            node.child_removed = node.child_removed.max(old.child_removed);
            let owner = std::mem::replace(old, node).owner();
            self.disown(owner);
        } else {
            self.nodes.insert(path.to_string(), node);
        }
    }

    fn remove_live(&mut self, path: &str) {
        if let Some(old) = self.nodes.remove(path) {
            self.disown(old.owner());
            if let Some(up) = parent(path).and_then(|p| self.nodes.get_mut(p)) {
                up.child_removed = self.generation;
            }
        }
    }

    fn disown(&mut self, owner: u32) {
        if let Some(c) = self.owned.get_mut(&owner) {
            *c = c.saturating_sub(1);
        }
    }

    /// Whether `path` changed after generation `since` (written, created or removed). A path
    /// missing now answers for its nearest existing ancestor, which was then re-created or lost
    /// a child after `since` if anything below it was removed: exact for what the transaction
    /// touched, conservative only in also counting a removed sibling below that ancestor.
    /// `absent` remembers the answer for missing paths, so a commit walks each ancestor once.
    fn changed_since<'a>(
        &self,
        path: &'a str,
        since: u64,
        absent: &mut HashMap<&'a str, bool>,
    ) -> bool {
        if let Some(n) = self.nodes.get(path) {
            return n.generation > since;
        }
        let mut walked = vec![path];
        let mut p = path;
        let changed = loop {
            let Some(up) = parent(p) else {
                break true;
            };
            if let Some(&c) = absent.get(up) {
                break c;
            }
            if let Some(n) = self.nodes.get(up) {
                break n.generation > since || n.child_removed > since;
            }
            walked.push(up);
            p = up;
        };
        for w in walked {
            absent.insert(w, changed);
        }
        changed
    }

    fn commit(&mut self, t: Tx) -> Result<()> {
        let since = t.start_gen;
        let mut absent = HashMap::new();
        let conflict = t.over.iter().any(|(p, e)| {
            self.changed_since(p, since, &mut absent)
                || (e.is_some()
                    && parent(p).is_some_and(|pp| self.changed_since(pp, since, &mut absent)))
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
            let removal = e.is_none();
            if let Some(n) = e.or(before) {
                self.fire(&p, &n, removal);
            }
        }
        Ok(())
    }

    /// Queues watch events for a change to `path` whose node (after a write, before a removal)
    /// is `node`: watches on the path, its ancestors and (for a `removal`) its descendants fire,
    /// for domains that may read the node. The work is one lookup per watched-path length up to
    /// `path`'s, plus one step per matching domain and per event.
    fn fire(&mut self, path: &str, node: &Node, removal: bool) {
        // Shared handles (a reference count each), not copies of the strings.
        let mut hits: Vec<(u32, Arc<str>, Arc<str>)> = Vec::new();
        let mut take = |watched: &Arc<str>, group: &BTreeMap<u32, Vec<Arc<str>>>| {
            for (&d, tokens) in group {
                if !can(d, node, PermKind::Read) {
                    self.step(Work::Watch);
                    continue;
                }
                for t in tokens {
                    self.step(Work::Watch);
                    hits.push((d, Arc::clone(watched), Arc::clone(t)));
                }
            }
        };
        let bytes = path.as_bytes();
        for &len in self.watches.lens.range(..=path.len()).map(|(l, _)| l) {
            // The path itself, the root, or a prefix ending where a component does.
            let ancestor = len == path.len() || len == 1 || bytes.get(len) == Some(&b'/');
            if let Some((watched, group)) = path
                .get(..len)
                .filter(|_| ancestor)
                .and_then(|p| self.watches.by_path.get_key_value(p))
            {
                take(watched, group);
            }
        }
        if removal {
            let below = if path == "/" {
                "/".to_string()
            } else {
                format!("{path}/")
            };
            let under = self
                .watches
                .by_path
                .range::<str, _>((Bound::Included(below.as_str()), Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(below.as_str()))
                .filter(|(k, _)| ***k != *path);
            for (watched, group) in under {
                take(watched, group);
            }
        }
        if hits.is_empty() {
            return;
        }
        let changed: Arc<str> = Arc::from(path);
        for (domid, watched, token) in hits {
            self.queue_event(domid, &watched, &changed, &token);
        }
    }

    /// Queues event `(path, token)` of the watch on `watched` for `domid`, within the domain's
    /// event quota (see [`EventQueue::lost`] for what happens beyond it); wakes the domain's
    /// server when its queue was empty (it drains everything queued once woken).
    fn queue_event(&mut self, domid: u32, watched: &Arc<str>, path: &Arc<str>, token: &Arc<str>) {
        if domid == 0
            && token.starts_with(LOCAL_TOKEN)
            && let Some(w) = self.local.get(token)
        {
            w();
            return;
        }
        let (cap, cap_bytes) = (self.quota.queued_events, self.quota.queued_event_bytes);
        let q = self.events.entry(domid).or_default();
        let was_empty = q.is_empty();
        let cost = path.len() + token.len();
        if !q.lost.is_empty() || q.queue.len() >= cap || q.bytes + cost > cap_bytes {
            let w: Event = (Arc::clone(watched), Arc::clone(token));
            if q.lost_set.insert(w.clone()) {
                q.lost.push_back(w);
            }
        } else {
            q.queue.push_back((Arc::clone(path), Arc::clone(token)));
            q.bytes += cost;
        }
        if was_empty && let Some(w) = self.wakers.get(&domid) {
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
            transaction_edits: 100,
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
        // A transaction cannot pile up more changes than its quota, even by write/rm.
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
        // Write/rm loops leave no bookkeeping, with transactions open or not.
        let t = s.transaction_start(3).unwrap();
        for i in 0..100 {
            s.write(2, 0, &format!("tmp{i}"), b"x").unwrap();
            s.rm(2, 0, &format!("tmp{i}")).unwrap();
        }
        s.transaction_end(3, t, false).unwrap();
        assert_eq!(
            s.lock().nodes.len(),
            3 + 2 * 3,
            "the root path and two homes"
        );
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
        // Home, name and domid are dom0's: the quota counts only what the domain creates.
        let quota = Quota {
            nodes: 6,
            ..Quota::default()
        };
        let s = store_with_traces_of_two(quota);
        // `mine` and five more outside its home fill it.
        for n in ["a", "b", "c", "d", "e"] {
            s.write(2, 0, &format!("/local/domain/0/backend/x/{n}"), b"")
                .unwrap();
        }
        assert_eq!(s.write(2, 0, "full", b""), Err(StoreErrno::ENOSPC));
        let dom0 = s.lock().owned[&0];
        s.release(2);
        // The six are dom0's now; the home's three, dom0's too, went with the home.
        assert_eq!(s.lock().owned[&0], dom0 + 6 - 3);
        s.introduce(2, "new two", Box::new(|| {}));
        for n in ["a", "b", "c", "d", "e", "f"] {
            s.write(2, 0, n, b"").unwrap();
        }
        assert_eq!(s.write(2, 0, "full", b""), Err(StoreErrno::ENOSPC));
        check_derived(&s);
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
    fn wrapped_transaction_ids_skip_open_ones_and_zero() {
        let s = store();
        let a = s.transaction_start(2).unwrap();
        // Four billion starts are out of reach of a test; put the counter where they would.
        s.lock().next_tx = u32::MAX;
        let b = s.transaction_start(3).unwrap();
        let c = s.transaction_start(3).unwrap();
        assert_eq!(b, u32::MAX);
        assert_ne!(c, 0, "0 means no transaction");
        assert_ne!(c, a, "an open transaction's id is not handed out again");
        // Both transactions still belong to their domains.
        s.write(2, a, "x", b"2").unwrap();
        assert_eq!(
            s.write(3, a, "/local/domain/3/x", b"3"),
            Err(StoreErrno::ENOENT)
        );
        s.transaction_end(2, a, true).unwrap();
        s.transaction_end(3, c, true).unwrap();
        assert_eq!(s.read(2, 0, "x").unwrap(), b"2");
    }

    #[test]
    fn a_guest_cannot_remove_or_take_over_its_home() {
        let s = store();
        let home = "/local/domain/2";
        assert_eq!(s.rm(2, 0, home), Err(StoreErrno::EACCES));
        let t = s.transaction_start(2).unwrap();
        assert_eq!(s.rm(2, t, home), Err(StoreErrno::EACCES));
        s.transaction_end(2, t, false).unwrap();
        assert_eq!(
            s.set_perms(2, 0, home, &[perm(PermKind::Both, 2)]),
            Err(StoreErrno::EACCES)
        );
        // Dom0 owns it; the guest reads and writes in it through the ACL.
        let perms = s.get_perms(2, 0, home).unwrap();
        assert_eq!(perms, [perm(PermKind::None, 0), perm(PermKind::Both, 2)]);
        s.write(2, 0, "data/x", b"1").unwrap();
        assert_eq!(s.get_perms(2, 0, "data/x").unwrap()[0].domid, DomId(2));
        s.rm(2, 0, "data").unwrap();
        // The toolstack's own keys are the guest's to read, not to change.
        assert_eq!(s.write(2, 0, "name", b"dom0"), Err(StoreErrno::EACCES));
        assert_eq!(s.rm(2, 0, "domid"), Err(StoreErrno::EACCES));
        assert_eq!(s.read(2, 0, "name").unwrap(), b"two");
        assert_eq!(s.read(2, 0, home).unwrap(), b"");
        // Nodes dom0 writes in the home are dom0's (not counted against the guest), and the
        // guest may use them.
        s.write(0, 0, "/local/domain/2/control/shutdown", b"")
            .unwrap();
        assert_eq!(
            s.get_perms(2, 0, "control/shutdown").unwrap()[0].domid,
            DomId(0)
        );
        s.write(2, 0, "control/shutdown", b"").unwrap();
    }

    #[test]
    fn every_edit_in_a_transaction_counts_against_its_quota() {
        let s = store();
        s.write(2, 0, "a", b"0").unwrap();
        // The same existing node rewritten again and again.
        let t = s.transaction_start(2).unwrap();
        let edits = (0..100_000).position(|_| s.write(2, t, "a", b"x").is_err());
        assert_eq!(edits, Some(Quota::default().transaction_edits));
        assert_eq!(s.write(2, t, "a", b"x"), Err(StoreErrno::ENOSPC));
        assert_eq!(
            s.set_perms(2, t, "a", &[perm(PermKind::None, 2)]),
            Err(StoreErrno::ENOSPC)
        );
        s.transaction_end(2, t, false).unwrap();
        // Many existing nodes rewritten, and their permissions set: each counts.
        for i in 0..600 {
            s.write(2, 0, &format!("n{i}"), b"0").unwrap();
        }
        let t = s.transaction_start(2).unwrap();
        let mut done = 0;
        let err = (0..600).flat_map(|i| [i, i]).find_map(|i| {
            let p = format!("n{i}");
            let r = s.write(2, t, &p, b"1");
            let r = r.and_then(|()| s.set_perms(2, t, &p, &[perm(PermKind::None, 2)]));
            done += 2;
            r.err()
        });
        assert_eq!(err, Some(StoreErrno::ENOSPC));
        assert!(done <= Quota::default().transaction_edits + 2, "{done}");
        // A fresh transaction has its own allowance, and what was refused was not applied.
        s.transaction_end(2, t, true).unwrap();
        let t = s.transaction_start(2).unwrap();
        s.write(2, t, "a", b"y").unwrap();
        s.transaction_end(2, t, true).unwrap();
        assert_eq!(s.read(2, 0, "a").unwrap(), b"y");
    }

    #[test]
    fn removing_many_nodes_does_not_abort_other_domains_transactions() {
        let s = store();
        s.write(2, 0, "dev/state", b"1").unwrap();
        let victim = s.transaction_start(2).unwrap();
        s.write(2, victim, "dev/state", b"4").unwrap();
        s.write(2, victim, "dev/ring-ref", b"8").unwrap();
        // Domain 3 keeps a transaction of its own open and churns through removals.
        let own = s.transaction_start(3).unwrap();
        s.write(3, own, "mine", b"x").unwrap();
        for i in 0..20_000 {
            let p = format!("junk/{i}");
            s.write(3, 0, &p, b"x").unwrap();
            s.rm(3, 0, &p).unwrap();
        }
        s.transaction_end(2, victim, true).unwrap();
        assert_eq!(s.read(2, 0, "dev/state").unwrap(), b"4");
        // It touched nothing that changed, so its own commit stands too.
        s.transaction_end(3, own, true).unwrap();
        assert_eq!(s.read(3, 0, "mine").unwrap(), b"x");
    }

    #[test]
    fn commits_still_see_every_removal_they_depend_on() {
        let s = store();
        s.write(2, 0, "a/b", b"1").unwrap();
        s.write(2, 0, "d/x", b"1").unwrap();
        // The node the transaction wrote was removed.
        let t = s.transaction_start(2).unwrap();
        s.write(2, t, "a/b", b"2").unwrap();
        s.rm(2, 0, "a/b").unwrap();
        assert_eq!(s.transaction_end(2, t, true), Err(StoreErrno::EAGAIN));
        // A node below one the transaction removed was removed (and the tree then re-grown).
        s.write(2, 0, "a/b/c", b"1").unwrap();
        let t = s.transaction_start(2).unwrap();
        s.rm(2, t, "a").unwrap();
        s.rm(2, 0, "a/b").unwrap();
        assert_eq!(s.transaction_end(2, t, true), Err(StoreErrno::EAGAIN));
        // A node the transaction creates came and went meanwhile.
        let t = s.transaction_start(2).unwrap();
        s.write(2, t, "d/new", b"t").unwrap();
        s.write(2, 0, "d/new", b"o").unwrap();
        s.rm(2, 0, "d/new").unwrap();
        assert_eq!(s.transaction_end(2, t, true), Err(StoreErrno::EAGAIN));
        // The parent went and came back.
        let t = s.transaction_start(2).unwrap();
        s.write(2, t, "d/y", b"t").unwrap();
        s.rm(2, 0, "d").unwrap();
        s.write(2, 0, "d/x", b"1").unwrap();
        assert_eq!(s.transaction_end(2, t, true), Err(StoreErrno::EAGAIN));
        // A removal elsewhere does not matter.
        s.write(2, 0, "e/z", b"1").unwrap();
        let t = s.transaction_start(2).unwrap();
        s.write(2, t, "d/y", b"t").unwrap();
        s.rm(2, 0, "e/z").unwrap();
        s.transaction_end(2, t, true).unwrap();
        assert_eq!(s.read(2, 0, "d/y").unwrap(), b"t");
    }

    #[test]
    fn watch_tokens_and_paths_are_bounded_per_domain() {
        let s = store();
        let q = Quota::default();
        // One token of 4 KiB is refused outright.
        assert_eq!(s.watch(2, "a", &"t".repeat(4096)), Err(StoreErrno::E2BIG));
        // Long paths with long tokens run into the domain's byte total before its watch count.
        let long = format!("/local/domain/2/{}", "p".repeat(2000));
        let token = "t".repeat(q.watch_token_bytes);
        let mut held = 0;
        let err = loop {
            match s.watch(2, &format!("{long}{held}"), &token) {
                Ok(()) => held += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(err, StoreErrno::ENOSPC);
        assert_eq!(held, q.watch_bytes / (long.len() + 1 + token.len()));
        assert!(held < q.watches);
        // Another domain is not affected, and removing a watch gives its bytes back.
        s.watch(3, &long, &token).unwrap();
        s.unwatch(2, &format!("{long}0"), &token).unwrap();
        s.watch(2, &format!("{long}0"), &token).unwrap();
        assert_eq!(
            s.watch(2, &format!("{long}x"), &token),
            Err(StoreErrno::ENOSPC)
        );
        // Dom0 is not limited.
        s.watch(0, &long, &"t".repeat(4096)).unwrap();
    }

    #[test]
    fn a_change_examines_only_the_watches_it_matches() {
        let s = store();
        // Domain 3 holds its whole quota of watches, none on what domain 2 changes.
        for i in 0..Quota::default().watches {
            s.watch(3, &format!("w{i}"), "t").unwrap();
        }
        while s.next_event(3).is_some() {}
        let steps = |s: &Store| s.lock().steps[Work::Watch as usize].replace(0);
        steps(&s);
        s.watch(2, "dev", "mine").unwrap();
        assert_eq!(
            steps(&s),
            0,
            "registering looks at no other domain's watches"
        );
        assert!(s.next_event(2).is_some());
        s.write(2, 0, "dev/state", b"1").unwrap();
        assert_eq!(steps(&s), 1, "one watch matched, nothing else looked at");
        {
            let g = s.lock();
            let (_, queued) = g.events[&2].queue.back().unwrap();
            let held = &g.watches.by_path["/local/domain/2/dev"][&2][0];
            assert!(
                Arc::ptr_eq(queued, held),
                "the event shares the watch's token"
            );
        }
        assert_eq!(
            s.next_event(2),
            Some(("/local/domain/2/dev/state".into(), "mine".into()))
        );
        s.write(2, 0, "elsewhere", b"1").unwrap();
        assert_eq!(steps(&s), 0);
        assert_eq!(s.next_event(2), None);
        assert_eq!(s.next_event(3), None);
    }

    #[test]
    fn a_removal_fires_the_watches_below_it_and_a_write_only_those_above() {
        let s = store();
        s.write(2, 0, "dev/vbd/state", b"1").unwrap();
        s.watch(2, "dev/vbd/state", "leaf").unwrap();
        s.watch(2, "/", "root").unwrap();
        while s.next_event(2).is_some() {}
        // As in Xen: a write fires the node's and its ancestors' watches.
        s.write(2, 0, "dev", b"x").unwrap();
        let ev: Vec<_> = std::iter::from_fn(|| s.next_event(2)).collect();
        assert_eq!(ev, [("/local/domain/2/dev".into(), "root".into())]);
        s.rm(2, 0, "dev").unwrap();
        let mut ev: Vec<_> = std::iter::from_fn(|| s.next_event(2)).collect();
        ev.sort();
        assert_eq!(
            ev,
            [
                ("/local/domain/2/dev".into(), "leaf".into()),
                ("/local/domain/2/dev".into(), "root".into())
            ]
        );
    }

    #[test]
    fn an_unread_event_queue_is_bounded_and_what_overflows_becomes_one_event_per_watch() {
        let s = Store::new(Quota {
            queued_events: 10,
            ..Quota::default()
        });
        let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = Arc::clone(&wakes);
        s.introduce(
            2,
            "two",
            Box::new(move || {
                w.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }),
        );
        s.watch(2, "a", "A").unwrap();
        s.watch(2, "b", "B").unwrap();
        while s.next_event(2).is_some() {}
        let woken = wakes.load(std::sync::atomic::Ordering::Relaxed);
        for i in 0..20 {
            s.write(2, 0, &format!("a/{i}"), b"x").unwrap();
        }
        s.write(2, 0, "b/x", b"x").unwrap();
        s.write(2, 0, "a/0", b"y").unwrap();
        assert_eq!(
            wakes.load(std::sync::atomic::Ordering::Relaxed),
            woken + 1,
            "woken when events appear, not once per event"
        );
        let ev: Vec<_> = std::iter::from_fn(|| s.next_event(2)).collect();
        let want: Vec<(Arc<str>, Arc<str>)> = (0..10)
            .map(|i| (format!("/local/domain/2/a/{i}").into(), "A".into()))
            .chain([
                ("/local/domain/2/a".into(), "A".into()),
                ("/local/domain/2/b".into(), "B".into()),
            ])
            .collect();
        assert_eq!(ev, want, "the oldest kept, the rest one event per watch");
        // Drained, the queue takes events again.
        s.write(2, 0, "b/y", b"x").unwrap();
        assert_eq!(
            s.next_event(2),
            Some(("/local/domain/2/b/y".into(), "B".into()))
        );
    }

    #[test]
    fn queued_events_are_bounded_in_bytes_and_for_every_domain() {
        let q = Quota::default();
        let s = store();
        let long = "p".repeat(2000);
        s.watch(2, "/local/domain/2", "t").unwrap();
        s.watch(0, "/local/domain/2", "dom0").unwrap();
        for i in 0..2 * q.queued_events {
            s.write(2, 0, &format!("{long}/{i}"), b"x").unwrap();
            s.rm(2, 0, &long).unwrap();
        }
        let g = s.lock();
        // Dom0 reads none of its events here: they are bounded too.
        for d in [0, 2] {
            let (n, bytes) = (g.events[&d].queue.len(), g.events[&d].bytes);
            let all: usize = g.events[&d]
                .queue
                .iter()
                .map(|(p, t)| p.len() + t.len())
                .sum();
            assert_eq!(bytes, all);
            assert!(
                bytes <= q.queued_event_bytes && n < q.queued_events,
                "{n} events, {bytes} B"
            );
            assert!(n >= q.queued_event_bytes / (long.len() + 40), "{n}");
            assert_eq!(g.events[&d].lost.len(), 1, "one watch overflowed");
        }
    }

    #[test]
    fn quotas_are_counted_without_scanning_transactions() {
        let s = store();
        for d in 3..13 {
            s.introduce(d, "other", Box::new(|| {}));
            for _ in 0..Quota::default().transactions {
                s.transaction_start(d).unwrap();
            }
        }
        let steps = |s: &Store| s.lock().steps[Work::Count as usize].replace(0);
        steps(&s);
        let t = s.transaction_start(2).unwrap();
        assert_eq!(
            steps(&s),
            0,
            "other domains' transactions are not counted one by one"
        );
        for i in 0..500 {
            s.write(2, t, &format!("n{i}"), b"x").unwrap();
        }
        steps(&s);
        s.write(2, t, "one-more", b"x").unwrap();
        s.write(2, t, "n0", b"y").unwrap();
        assert_eq!(
            steps(&s),
            0,
            "the transaction's changes are not counted one by one"
        );
        // The commit re-checks the quota once, over its changes.
        s.transaction_end(2, t, true).unwrap();
        assert_eq!(steps(&s), 501);
        assert_eq!(s.read(2, 0, "n0").unwrap(), b"y");
        assert_eq!(s.lock().owned[&2], 501);
    }

    #[test]
    fn listing_a_directory_costs_its_children_not_its_subtree() {
        let s = store();
        for i in 0..900 {
            s.write(2, 0, &format!("big/sub/n{i}"), b"").unwrap();
        }
        s.write(2, 0, "big/sub-x", b"").unwrap();
        s.write(2, 0, "big/a", b"").unwrap();
        let t = s.transaction_start(2).unwrap();
        s.write(2, t, "big/sub/n1000", b"").unwrap();
        s.write(2, t, "big/b/c", b"").unwrap();
        s.rm(2, t, "big/a").unwrap();
        let steps = |s: &Store| s.lock().steps[Work::Seek as usize].replace(0);
        steps(&s);
        assert_eq!(s.directory(2, 0, "big").unwrap(), ["a", "sub", "sub-x"]);
        let live = steps(&s);
        assert_eq!(s.directory(2, t, "big").unwrap(), ["b", "sub", "sub-x"]);
        let in_tx = steps(&s);
        assert!(live <= 8 && in_tx <= 16, "{live} and {in_tx} steps");
        assert_eq!(s.directory(2, t, "big/b").unwrap(), ["c"]);
        assert_eq!(s.directory(2, 0, "big/sub").unwrap().len(), 900);
        assert_eq!(
            s.directory(0, 0, "/").unwrap(),
            ["local"],
            "the root lists its children too"
        );
    }

    #[test]
    fn a_deep_write_finds_its_parent_in_a_few_lookups() {
        let s = store();
        let chain = |levels: usize| "c/".repeat(levels).trim_end_matches('/').to_string();
        s.write(2, 0, &chain(900), b"").unwrap();
        let steps = |s: &Store| s.lock().steps[Work::Probe as usize].replace(0);
        steps(&s);
        // 600 levels more than the quota has room for.
        assert_eq!(s.write(2, 0, &chain(1500), b""), Err(StoreErrno::ENOSPC));
        let refused = steps(&s);
        s.write(2, 0, &chain(950), b"x").unwrap();
        let made = steps(&s);
        assert!(refused <= 12 && made <= 12, "{refused} and {made} lookups");
        assert_eq!(s.read(2, 0, &chain(950)).unwrap(), b"x");
        assert_eq!(s.read(2, 0, &chain(925)).unwrap(), b"");
        assert_eq!(s.lock().owned[&2], 950);
        // In a transaction too, and the commit creates the chain's missing part.
        let t = s.transaction_start(2).unwrap();
        s.write(2, t, &chain(960), b"t").unwrap();
        assert_eq!(s.read(2, t, &chain(955)).unwrap(), b"");
        s.transaction_end(2, t, true).unwrap();
        assert_eq!(s.read(2, 0, &chain(960)).unwrap(), b"t");
        assert_eq!(s.lock().owned[&2], 960);
    }

    /// Recomputes from the tree, the watches, the transactions and the queues everything the
    /// store keeps as derived state, and compares.
    fn check_derived(s: &Store) {
        let g = s.lock();
        let mut owned: HashMap<u32, usize> = HashMap::new();
        for (p, n) in &g.nodes {
            *owned.entry(n.owner()).or_default() += 1;
            if let Some(up) = parent(p) {
                assert!(g.nodes.contains_key(up), "{p} has no parent");
            }
        }
        for (d, &c) in &g.owned {
            assert_eq!(owned.remove(d).unwrap_or(0), c, "nodes of {d}");
        }
        assert!(owned.is_empty(), "uncounted owners {owned:?}");
        let mut lens: BTreeMap<usize, usize> = BTreeMap::new();
        let mut by_dom: HashMap<u32, (usize, usize)> = HashMap::new();
        for (path, group) in &g.watches.by_path {
            assert!(!group.is_empty(), "{path}");
            *lens.entry(path.len()).or_default() += 1;
            for (d, tokens) in group {
                assert!(!tokens.is_empty());
                // dom0's in-process watches are indexed by path only.
                let listed: Vec<_> = tokens
                    .iter()
                    .filter(|t| *d != 0 || !g.local.contains_key(*t))
                    .collect();
                if listed.is_empty() {
                    continue;
                }
                let (n, b) = by_dom.entry(*d).or_default();
                *n += listed.len();
                *b += listed.iter().map(|t| path.len() + t.len()).sum::<usize>();
            }
        }
        assert_eq!(g.watches.lens, lens);
        for (d, (list, bytes)) in &g.watches.by_dom {
            assert_eq!(
                by_dom.remove(d).unwrap_or_default(),
                (list.len(), *bytes),
                "{d}"
            );
            for (p, t) in list {
                assert!(g.watches.holds(*d, p, t));
            }
        }
        assert!(by_dom.is_empty(), "unlisted watches of {by_dom:?}");
        for (d, &n) in &g.open_txs {
            assert_eq!(g.txs.values().filter(|t| t.domid == *d).count(), n, "{d}");
        }
        for t in g.txs.values() {
            assert!(g.open_txs.get(&t.domid).is_some_and(|&n| n > 0));
            let mine = |n: Option<&Node>| i64::from(n.is_some_and(|n| n.owner() == t.domid));
            let delta: i64 = t
                .over
                .iter()
                .map(|(p, e)| mine(e.as_ref()) - mine(g.nodes.get(p)))
                .sum();
            assert_eq!(t.owned_delta, delta, "transaction of {}", t.domid);
        }
        for (d, q) in &g.events {
            let bytes: usize = q.queue.iter().map(|(p, t)| p.len() + t.len()).sum();
            assert_eq!(q.bytes, bytes, "queue of {d}");
            assert_eq!(q.lost.len(), q.lost_set.len());
            assert!(q.lost.iter().all(|w| q.lost_set.contains(w)));
        }
        let overlays = g.txs.values().flat_map(|t| t.over.values().flatten());
        for n in g.nodes.values().chain(overlays) {
            for p in &n.perms {
                let d = u32::from(p.domid.0);
                assert!(
                    d == 0 || g.wakers.contains_key(&d) || g.named_absent.contains(&d),
                    "{d} is named while absent and introduce would not know"
                );
            }
        }
    }

    /// Whether any permission list, live or in an open transaction, names `domid`.
    fn named_anywhere(s: &Store, domid: u32) -> bool {
        let g = s.lock();
        let overlays = g.txs.values().flat_map(|t| t.over.values().flatten());
        g.nodes
            .values()
            .chain(overlays)
            .any(|n| n.perms.iter().any(|p| u32::from(p.domid.0) == domid))
    }

    #[test]
    fn a_release_leaves_every_count_and_index_true() {
        let s = store_with_traces_of_two(Quota::default());
        let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = Arc::clone(&wakes);
        s.introduce(
            2,
            "two",
            Box::new(move || {
                w.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }),
        );
        let dir = "/local/domain/0/backend/x";
        // Domain 2: nodes in its home and outside, one it lets 3 write, watches (one on a path 3
        // watches too), events it never read, transactions left open.
        s.write(2, 0, "data/a", b"1").unwrap();
        for n in ["lent", "gone", "also-gone", "kept"] {
            s.write(2, 0, &format!("{dir}/{n}"), b"2").unwrap();
        }
        s.set_perms(
            2,
            0,
            &format!("{dir}/lent"),
            &[perm(PermKind::None, 2), both(3)],
        )
        .unwrap();
        s.set_perms(0, 0, dir, &[perm(PermKind::None, 0), both(2), both(3)])
            .unwrap();
        s.watch(2, dir, "two").unwrap();
        s.watch(2, "data", "own").unwrap();
        s.watch(3, dir, "three").unwrap();
        s.watch(0, "/local/domain/2", "dom0").unwrap();
        for i in 0..3 {
            let t = s.transaction_start(2).unwrap();
            s.write(2, t, &format!("tx{i}"), b"x").unwrap();
        }
        // Domain 3's transaction changes 2's node and names 2 in a node of its own.
        let t3 = s.transaction_start(3).unwrap();
        s.write(3, t3, &format!("{dir}/lent"), b"3").unwrap();
        s.write(3, t3, "later", b"3").unwrap();
        s.set_perms(3, t3, "later", &[perm(PermKind::None, 3), both(2)])
            .unwrap();
        // Dom0's removes two of 2's nodes, rewrites another and creates one below it (owned by
        // 2): its count of dom0's nodes changes by one as they pass.
        let t0 = s.transaction_start(0).unwrap();
        s.rm(0, t0, &format!("{dir}/gone")).unwrap();
        s.rm(0, t0, &format!("{dir}/also-gone")).unwrap();
        s.write(0, t0, &format!("{dir}/kept"), b"0").unwrap();
        s.write(0, t0, &format!("{dir}/kept/below"), b"0").unwrap();
        while s.next_event(0).is_some() {}
        while s.next_event(3).is_some() {}
        check_derived(&s);
        let woken = wakes.load(std::sync::atomic::Ordering::Relaxed);
        let dom0 = s.lock().owned[&0];

        s.release(2);
        check_derived(&s);
        assert_eq!(wakes.load(std::sync::atomic::Ordering::Relaxed), woken);
        {
            let g = s.lock();
            assert!(!g.owned.contains_key(&2));
            // Its five nodes outside its home are dom0's now; data and data/a went with the
            // home, and so did dom0's home, name and domid.
            assert_eq!(g.owned[&0], dom0 + 5 - 3);
            assert!(g.watches.usage(2) == (0, 0) && !g.events.contains_key(&2));
            assert_eq!(g.open_txs.get(&2), None);
            assert_eq!(g.txs.len(), 2);
        }
        assert!(!named_anywhere(&s, 2));
        // Dom0 heard of the home's removal; 3's watch on the shared directory still fires.
        assert_eq!(
            s.next_event(0),
            Some(("/local/domain/2".into(), "dom0".into()))
        );
        s.write(0, 0, &format!("{dir}/new"), b"").unwrap();
        assert_eq!(
            s.next_event(3),
            Some((format!("{dir}/new").into(), "three".into()))
        );
        // Nothing either transaction touched changed: both commit, naming nobody gone.
        s.transaction_end(3, t3, true).unwrap();
        s.transaction_end(0, t0, true).unwrap();
        assert_eq!(s.read(0, 0, &format!("{dir}/lent")).unwrap(), b"3");
        assert_eq!(
            s.get_perms(0, 0, &format!("{dir}/lent")).unwrap(),
            [perm(PermKind::None, 0), both(3)]
        );
        assert_eq!(
            s.get_perms(0, 0, &format!("{dir}/kept/below")).unwrap()[0],
            perm(PermKind::None, 0)
        );
        assert_eq!(
            s.read(0, 0, &format!("{dir}/gone")),
            Err(StoreErrno::ENOENT)
        );
        assert!(!named_anywhere(&s, 2));
        check_derived(&s);
        // Dom0 removing what passed to it gives the count back.
        let dom0 = s.lock().owned[&0];
        s.rm(0, 0, &format!("{dir}/kept")).unwrap();
        assert_eq!(s.lock().owned[&0], dom0 - 2);
        check_derived(&s);
    }

    #[test]
    fn introduce_forgets_what_named_the_id_while_nobody_had_it() {
        let s = store();
        s.release(2);
        // A back end of the old domain sets permissions for it once more, and domain 3's
        // transaction names the id.
        s.write(0, 0, "/backend/vif/2/0/state", b"6").unwrap();
        s.set_perms(
            0,
            0,
            "/backend/vif/2/0/state",
            &[perm(PermKind::None, 0), perm(PermKind::Read, 2)],
        )
        .unwrap();
        let t = s.transaction_start(3).unwrap();
        s.write(3, t, "offer", b"").unwrap();
        s.set_perms(3, t, "offer", &[perm(PermKind::None, 3), both(2)])
            .unwrap();
        check_derived(&s);
        s.introduce(2, "new two", Box::new(|| {}));
        assert!(!s.lock().named_absent.contains(&2));
        assert_eq!(
            s.read(2, 0, "/backend/vif/2/0/state"),
            Err(StoreErrno::EACCES)
        );
        s.transaction_end(3, t, true).unwrap();
        assert_eq!(
            s.read(2, 0, "/local/domain/3/offer"),
            Err(StoreErrno::EACCES)
        );
        // Named once the new domain has the id, it is the new domain that is named.
        s.set_perms(
            0,
            0,
            "/backend/vif/2/0/state",
            &[perm(PermKind::None, 0), perm(PermKind::Read, 2)],
        )
        .unwrap();
        assert_eq!(s.read(2, 0, "/backend/vif/2/0/state").unwrap(), b"6");
        assert!(s.lock().named_absent.is_empty());
        check_derived(&s);
    }

    #[test]
    fn a_release_looks_at_each_node_once_and_introducing_an_unnamed_id_at_none() {
        let s = store();
        for i in 0..500 {
            s.write(3, 0, &format!("n{i}"), b"x").unwrap();
        }
        let t = s.transaction_start(3).unwrap();
        for i in 0..20 {
            s.write(3, t, &format!("t{i}"), b"x").unwrap();
        }
        let steps = |s: &Store| s.lock().steps[Work::Scrub as usize].replace(0);
        steps(&s);
        s.introduce(4, "four", Box::new(|| {}));
        assert_eq!(steps(&s), 0, "a fresh id: no pass over the store");
        s.write(4, 0, "x", b"").unwrap();
        s.release(4);
        let nodes = s.lock().nodes.len() as u64;
        assert_eq!(
            steps(&s),
            nodes + 20,
            "each node and transaction change once"
        );
        s.introduce(4, "four again", Box::new(|| {}));
        assert_eq!(steps(&s), 0, "nothing named 4 since its release");
        s.release(4);
        steps(&s);
        s.set_perms(3, t, "t0", &[perm(PermKind::None, 3), both(4)])
            .unwrap();
        s.introduce(4, "four at last", Box::new(|| {}));
        assert!(steps(&s) > nodes, "4 was named meanwhile: forgotten first");
        assert_eq!(s.get_perms(3, t, "t0").unwrap(), [perm(PermKind::None, 3)]);
        check_derived(&s);
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

    #[test]
    fn a_local_watch_calls_back_for_its_subtree_only_and_queues_nothing() {
        use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
        let s = Arc::new(store());
        let calls = Arc::new(AtomicU32::new(0));
        let n = || calls.load(Relaxed);
        let c = Arc::clone(&calls);
        let w = s.watch_local(
            "/local/domain/2/device/vbd/5/state",
            Box::new(move || {
                c.fetch_add(1, Relaxed);
            }),
        );
        assert_eq!(n(), 1, "once at registration");
        s.write(2, 0, "device/vbd/5/state", b"1").unwrap();
        assert_eq!(n(), 2);
        s.write(2, 0, "device/vbd/5/state/x", b"").unwrap();
        assert_eq!(n(), 3, "below it");
        s.write(2, 0, "device/vbd/5/ring-ref", b"8").unwrap();
        s.write(2, 0, "device/vbd/6/state", b"1").unwrap();
        s.read(2, 0, "device/vbd/5/state").unwrap();
        assert_eq!(n(), 3, "beside it, or a read: nothing");
        // A transaction's change is news at its commit.
        let t = s.transaction_start(2).unwrap();
        s.write(2, t, "device/vbd/5/state", b"3").unwrap();
        assert_eq!(n(), 3);
        s.transaction_end(2, t, true).unwrap();
        assert_eq!(n(), 4);
        // The domain goes: its home and everything below are removed.
        check_derived(&s);
        s.release(2);
        assert_eq!(n(), 5);
        assert_eq!(s.next_event(0), None, "nothing queued for dom0");
        drop(w);
        s.introduce(2, "two again", Box::new(|| {}));
        s.write(2, 0, "device/vbd/5/state", b"1").unwrap();
        assert_eq!(n(), 5, "gone with its handle");
        check_derived(&s);
        assert!(s.lock().local.is_empty());
        assert!(s.lock().watches.by_path.is_empty());
    }
}
