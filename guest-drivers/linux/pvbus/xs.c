// SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause
/*
 * The config store client (xenstore wire protocol over the store page's
 * two byte rings and the store event channel).
 *
 * Threads:
 *  - callers of pvbus_xs_*() send one request at a time (xs_request_mutex)
 *    and sleep until the reader hands them the answer with their req_id;
 *  - "pvbus-xs" reads every message off the response ring: answers go to
 *    the waiting caller, watch events to the watch thread's queue;
 *  - "pvbus-watch" runs watch callbacks, one at a time, so callbacks may
 *    themselves use the store.  Unregistering a watch waits for that
 *    watch's own callback only, never for another watch's: a callback that
 *    unregisters a device can then not deadlock against a driver's removal
 *    that unregisters the device's watch.
 *
 * The rings are shared with the store server and treated as hostile: our
 * own indices are kept privately, the server's index is checked on every
 * read (never more than a ring's worth outstanding), and a message longer
 * than SV_XS_PAYLOAD_MAX breaks the connection.  A broken connection fails
 * every later request with -EIO.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/err.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/kthread.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/uio.h>
#include <linux/wait.h>
#include <asm/barrier.h>

#include "pvbus.h"

#define XS_TIMEOUT	(30 * HZ)
#define XS_RING_MASK	(SV_XS_RING_SIZE - 1)

const char *pvbus_home;

static struct sv_xs_interface *xs_intf;
static unsigned int xs_port;
/* Our indices, kept privately and only written to the page. */
static u32 xs_req_prod;		/* under xs_request_mutex */
static u32 xs_rsp_cons;		/* reader thread only */
static bool xs_broken;
/* Woken by the store event: data to read or space to write. */
static DECLARE_WAIT_QUEUE_HEAD(xs_ring_wq);

/* One request in flight; also serialises writers of the request ring. */
static DEFINE_MUTEX(xs_request_mutex);
static u32 xs_last_req_id;

/* The answer the current caller waits for, filled in by the reader. */
static DEFINE_SPINLOCK(xs_reply_lock);
static DECLARE_WAIT_QUEUE_HEAD(xs_reply_wq);
static u32 xs_reply_want;
static bool xs_reply_ready;
static struct sv_xs_msg_header xs_reply_hdr;
static char *xs_reply_body;	/* or ERR_PTR */

static struct task_struct *xs_reader;
static struct task_struct *xs_watcher;
static char xs_rx_buf[SV_XS_PAYLOAD_MAX + 1];	/* reader thread only */

/* Registered watches; xs_watches_lock also covers queueing their events. */
static DEFINE_SPINLOCK(xs_watches_lock);
static LIST_HEAD(xs_watches);
static u32 xs_last_token;

struct xs_watch_event {
	struct list_head list;
	struct pvbus_watch *watch;
	char path[];
};

/* Queued events and the watch whose callback runs, under xs_events_lock. */
static DEFINE_SPINLOCK(xs_events_lock);
static LIST_HEAD(xs_events);
static struct pvbus_watch *xs_running_watch;
static DECLARE_WAIT_QUEUE_HEAD(xs_events_wq);
static DECLARE_WAIT_QUEUE_HEAD(xs_callback_done_wq);

static void xs_fail(const char *why)
{
	if (!xchg(&xs_broken, true))
		pr_err("store connection broken: %s; store requests now fail\n",
		       why);
	wake_up_all(&xs_ring_wq);
	wake_up_all(&xs_reply_wq);
}

static void xs_event(unsigned int port, void *data)
{
	wake_up(&xs_ring_wq);
}

/* ---- the byte rings ---- */

static bool xs_rsp_available(void)
{
	return READ_ONCE(xs_intf->rsp_prod) != xs_rsp_cons;
}

/* Copies up to @len available bytes of the response ring; < 0: broken. */
static int xs_ring_read(char *dst, size_t len)
{
	u32 prod, avail, off, chunk, n;

	prod = READ_ONCE(xs_intf->rsp_prod);
	/* Read the bytes only after the index that covers them. */
	virt_rmb();
	avail = prod - xs_rsp_cons;
	if (avail > SV_XS_RING_SIZE)
		return -EIO;
	n = min_t(u32, avail, len);
	off = xs_rsp_cons & XS_RING_MASK;
	chunk = min_t(u32, n, SV_XS_RING_SIZE - off);
	memcpy(dst, xs_intf->rsp + off, chunk);
	memcpy(dst + chunk, xs_intf->rsp, n - chunk);
	/* Finish reading before the server may overwrite the space. */
	virt_mb();
	xs_rsp_cons += n;
	WRITE_ONCE(xs_intf->rsp_cons, xs_rsp_cons);
	if (n)
		pvbus_evtchn_notify(xs_port);
	return n;
}

static bool xs_req_space(void)
{
	/* An invalid index also ends the wait: xs_ring_write() reports it. */
	return xs_req_prod - READ_ONCE(xs_intf->req_cons) != SV_XS_RING_SIZE;
}

/* Writes as much of @src as fits; < 0: broken. */
static int xs_ring_write(const char *src, size_t len)
{
	u32 cons, used, off, chunk, n;

	cons = READ_ONCE(xs_intf->req_cons);
	/* See the server's consumption before overwriting that space. */
	virt_mb();
	used = xs_req_prod - cons;
	if (used > SV_XS_RING_SIZE)
		return -EIO;
	n = min_t(u32, SV_XS_RING_SIZE - used, len);
	off = xs_req_prod & XS_RING_MASK;
	chunk = min_t(u32, n, SV_XS_RING_SIZE - off);
	memcpy(xs_intf->req + off, src, chunk);
	memcpy(xs_intf->req, src + chunk, n - chunk);
	/* The bytes must be visible before the index that publishes them. */
	virt_wmb();
	xs_req_prod += n;
	WRITE_ONCE(xs_intf->req_prod, xs_req_prod);
	if (n)
		pvbus_evtchn_notify(xs_port);
	return n;
}

static int xs_write_all(const void *data, size_t len)
{
	const char *p = data;
	int n;

	while (len) {
		if (!wait_event_timeout(xs_ring_wq,
					xs_req_space() || READ_ONCE(xs_broken),
					XS_TIMEOUT)) {
			/* Part of a message may be out: the stream is lost. */
			xs_fail("request ring full for too long");
			return -ETIMEDOUT;
		}
		if (READ_ONCE(xs_broken))
			return -EIO;
		n = xs_ring_write(p, len);
		if (n < 0) {
			xs_fail("server's request-ring index is invalid");
			return n;
		}
		p += n;
		len -= n;
	}
	return 0;
}

/* Reader thread: reads exactly @len bytes; < 0 on stop or broken ring. */
static int xs_read_all(char *dst, size_t len)
{
	int n;

	while (len) {
		wait_event_interruptible(xs_ring_wq,
					 xs_rsp_available() ||
					 READ_ONCE(xs_broken) ||
					 kthread_should_stop());
		if (kthread_should_stop())
			return -EINTR;
		if (READ_ONCE(xs_broken))
			return -EIO;
		n = xs_ring_read(dst, len);
		if (n < 0) {
			xs_fail("server's response-ring index is invalid");
			return n;
		}
		dst += n;
		len -= n;
	}
	return 0;
}

/* ---- messages in ---- */

static void xs_deliver_reply(const struct sv_xs_msg_header *hdr,
			     const char *body)
{
	char *copy = kmemdup(body, hdr->len + 1, GFP_KERNEL);

	spin_lock(&xs_reply_lock);
	if (hdr->req_id && hdr->req_id == xs_reply_want && !xs_reply_ready) {
		xs_reply_hdr = *hdr;
		xs_reply_body = copy ? copy : ERR_PTR(-ENOMEM);
		xs_reply_ready = true;
		copy = NULL;
	}
	spin_unlock(&xs_reply_lock);
	if (copy) {
		/* A caller that timed out, or a server answering twice. */
		pr_warn_ratelimited("dropping store answer to request %u\n",
				    hdr->req_id);
		kfree(copy);
	} else {
		wake_up(&xs_reply_wq);
	}
}

static void xs_queue_watch_event(const char *body, u32 len)
{
	const char *path = body, *token;
	struct xs_watch_event *ev;
	struct pvbus_watch *w;
	size_t plen;
	u32 id;

	/* "<path>\0<token>\0"; body is NUL-terminated at len. */
	plen = strnlen(path, len);
	if (plen + 1 >= len)
		goto bad;
	token = path + plen + 1;
	if (token[0] != 'p' || token[1] != 'v' || kstrtou32(token + 2, 10, &id))
		goto bad;

	ev = kmalloc(struct_size(ev, path, plen + 1), GFP_KERNEL);
	if (!ev) {
		pr_warn_ratelimited("no memory for watch event on %s\n", path);
		return;
	}
	memcpy(ev->path, path, plen + 1);

	spin_lock(&xs_watches_lock);
	list_for_each_entry(w, &xs_watches, list) {
		if (w->token == id) {
			ev->watch = w;
			spin_lock(&xs_events_lock);
			list_add_tail(&ev->list, &xs_events);
			spin_unlock(&xs_events_lock);
			ev = NULL;
			break;
		}
	}
	spin_unlock(&xs_watches_lock);
	if (ev)
		kfree(ev);	/* a watch just unregistered */
	else
		wake_up(&xs_events_wq);
	return;
bad:
	pr_warn_ratelimited("malformed watch event\n");
}

static int xs_reader_fn(void *unused)
{
	struct sv_xs_msg_header hdr;

	while (!kthread_should_stop()) {
		if (xs_read_all((char *)&hdr, sizeof(hdr)))
			break;
		if (hdr.len > SV_XS_PAYLOAD_MAX) {
			xs_fail("message longer than the protocol allows");
			break;
		}
		if (xs_read_all(xs_rx_buf, hdr.len))
			break;
		xs_rx_buf[hdr.len] = '\0';
		if (hdr.msg_type == SV_XS_WATCH_EVENT)
			xs_queue_watch_event(xs_rx_buf, hdr.len);
		else
			xs_deliver_reply(&hdr, xs_rx_buf);
	}
	/* Broken or stopping: wait for kthread_stop(), which reaps us. */
	wait_event_interruptible(xs_ring_wq, kthread_should_stop());
	return 0;
}

static bool xs_watch_running(struct pvbus_watch *w)
{
	bool running;

	spin_lock(&xs_events_lock);
	running = xs_running_watch == w;
	spin_unlock(&xs_events_lock);
	return running;
}

static int xs_watch_thread_fn(void *unused)
{
	struct xs_watch_event *ev;

	while (!kthread_should_stop()) {
		wait_event_interruptible(xs_events_wq,
					 !list_empty(&xs_events) ||
					 kthread_should_stop());
		spin_lock(&xs_events_lock);
		ev = list_first_entry_or_null(&xs_events, struct xs_watch_event,
					      list);
		if (ev) {
			list_del(&ev->list);
			xs_running_watch = ev->watch;
		}
		spin_unlock(&xs_events_lock);
		if (!ev)
			continue;
		ev->watch->callback(ev->watch, ev->path);
		kfree(ev);
		spin_lock(&xs_events_lock);
		xs_running_watch = NULL;
		spin_unlock(&xs_events_lock);
		wake_up_all(&xs_callback_done_wq);
	}
	return 0;
}

/* ---- requests ---- */

static int xs_errno(const char *name)
{
#define XS_ERROR_ENTRY(e) { #e, e },
	static const struct {
		const char *name;
		int err;
	} table[] = { SV_XS_ERRORS(XS_ERROR_ENTRY) };
#undef XS_ERROR_ENTRY
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(table); i++)
		if (!strcmp(name, table[i].name))
			return -table[i].err;
	pr_warn_ratelimited("unknown store error %.16s\n", name);
	return -EINVAL;
}

/* Sends one request and returns the answer's body (NUL-terminated). */
static char *xs_talk(pvbus_xs_tx_t tx, u32 type, const struct kvec *vec,
		     unsigned int nvec, unsigned int *len)
{
	struct sv_xs_msg_header hdr = { .msg_type = type, .tx_id = tx };
	char *body = NULL;
	unsigned int i;
	long left;
	int err;

	for (i = 0; i < nvec; i++)
		hdr.len += vec[i].iov_len;
	if (hdr.len > SV_XS_PAYLOAD_MAX)
		return ERR_PTR(-E2BIG);

	mutex_lock(&xs_request_mutex);
	if (READ_ONCE(xs_broken)) {
		err = -EIO;
		goto out;
	}
	if (!++xs_last_req_id)		/* 0 means "no request" */
		xs_last_req_id = 1;
	hdr.req_id = xs_last_req_id;
	spin_lock(&xs_reply_lock);
	xs_reply_want = hdr.req_id;
	xs_reply_ready = false;
	spin_unlock(&xs_reply_lock);

	err = xs_write_all(&hdr, sizeof(hdr));
	for (i = 0; !err && i < nvec; i++)
		err = xs_write_all(vec[i].iov_base, vec[i].iov_len);
	left = err ? 1 : wait_event_timeout(xs_reply_wq,
					    READ_ONCE(xs_reply_ready) ||
					    READ_ONCE(xs_broken),
					    XS_TIMEOUT);

	spin_lock(&xs_reply_lock);
	if (xs_reply_ready) {
		hdr = xs_reply_hdr;
		body = xs_reply_body;
	}
	xs_reply_want = 0;
	xs_reply_ready = false;
	xs_reply_body = NULL;
	spin_unlock(&xs_reply_lock);

	if (!err && !body) {
		err = left ? -EIO : -ETIMEDOUT;
		if (!left)
			pr_warn("store request %u (type %u) timed out\n",
				hdr.req_id, type);
	}
	if (!err && IS_ERR(body)) {
		err = PTR_ERR(body);
		body = NULL;
	}
out:
	mutex_unlock(&xs_request_mutex);
	if (err)
		return ERR_PTR(err);
	if (hdr.msg_type == SV_XS_ERROR) {
		err = xs_errno(body);
		kfree(body);
		return ERR_PTR(err);
	}
	if (hdr.msg_type != type) {
		pr_warn_ratelimited("store answered type %u to request type %u\n",
				    hdr.msg_type, type);
		kfree(body);
		return ERR_PTR(-EIO);
	}
	if (len)
		*len = hdr.len;
	return body;
}

static char *xs_path(const char *dir, const char *node)
{
	if (!node || !*node)
		return kstrdup(dir, GFP_KERNEL);
	return kasprintf(GFP_KERNEL, "%s/%s", dir, node);
}

/* One request whose payload is a path and, optionally, raw bytes. */
static char *xs_path_talk(pvbus_xs_tx_t tx, u32 type, const char *dir,
			  const char *node, const char *data, size_t dlen,
			  unsigned int *len)
{
	struct kvec vec[2];
	char *path, *ret;

	path = xs_path(dir, node);
	if (!path)
		return ERR_PTR(-ENOMEM);
	vec[0].iov_base = path;
	vec[0].iov_len = strlen(path) + 1;
	vec[1].iov_base = (void *)data;
	vec[1].iov_len = dlen;
	ret = xs_talk(tx, type, vec, data ? 2 : 1, len);
	kfree(path);
	return ret;
}

static int xs_path_talk_noreply(pvbus_xs_tx_t tx, u32 type, const char *dir,
				const char *node, const char *data,
				size_t dlen)
{
	char *ret = xs_path_talk(tx, type, dir, node, data, dlen, NULL);

	if (IS_ERR(ret))
		return PTR_ERR(ret);
	kfree(ret);
	return 0;
}

char *pvbus_xs_read(pvbus_xs_tx_t tx, const char *dir, const char *node,
		    unsigned int *len)
{
	return xs_path_talk(tx, SV_XS_READ, dir, node, NULL, 0, len);
}
EXPORT_SYMBOL_GPL(pvbus_xs_read);

int pvbus_xs_write(pvbus_xs_tx_t tx, const char *dir, const char *node,
		   const char *value)
{
	return xs_path_talk_noreply(tx, SV_XS_WRITE, dir, node, value,
				    strlen(value));
}
EXPORT_SYMBOL_GPL(pvbus_xs_write);

int pvbus_xs_printf(pvbus_xs_tx_t tx, const char *dir, const char *node,
		    const char *fmt, ...)
{
	va_list ap;
	char *value;
	int ret;

	va_start(ap, fmt);
	value = kvasprintf(GFP_KERNEL, fmt, ap);
	va_end(ap);
	if (!value)
		return -ENOMEM;
	ret = pvbus_xs_write(tx, dir, node, value);
	kfree(value);
	return ret;
}
EXPORT_SYMBOL_GPL(pvbus_xs_printf);

int pvbus_xs_read_uint(pvbus_xs_tx_t tx, const char *dir, const char *node,
		       unsigned int *value)
{
	char *s = pvbus_xs_read(tx, dir, node, NULL);
	int ret;

	if (IS_ERR(s))
		return PTR_ERR(s);
	ret = kstrtouint(strim(s), 10, value);
	kfree(s);
	return ret;
}
EXPORT_SYMBOL_GPL(pvbus_xs_read_uint);

unsigned int pvbus_xs_read_uint_default(const char *dir, const char *node,
					unsigned int def)
{
	unsigned int v;

	return pvbus_xs_read_uint(PVBUS_XS_NO_TX, dir, node, &v) ? def : v;
}
EXPORT_SYMBOL_GPL(pvbus_xs_read_uint_default);

char **pvbus_xs_directory(pvbus_xs_tx_t tx, const char *dir,
			  const char *node, unsigned int *num)
{
	unsigned int len, n = 0, i;
	char *body, *p, **names;

	body = xs_path_talk(tx, SV_XS_DIRECTORY, dir, node, NULL, 0, &len);
	if (IS_ERR(body))
		return ERR_CAST(body);
	for (p = body; p < body + len; p += strlen(p) + 1)
		n++;
	/* The pointers, then the strings, in one allocation. */
	names = kmalloc(array_size(n + 1, sizeof(*names)) + len + 1,
			GFP_KERNEL);
	if (!names) {
		kfree(body);
		return ERR_PTR(-ENOMEM);
	}
	p = (char *)(names + n + 1);
	memcpy(p, body, len + 1);
	kfree(body);
	for (i = 0; i < n; i++) {
		names[i] = p;
		p += strlen(p) + 1;
	}
	names[n] = NULL;
	*num = n;
	return names;
}
EXPORT_SYMBOL_GPL(pvbus_xs_directory);

int pvbus_xs_rm(pvbus_xs_tx_t tx, const char *dir, const char *node)
{
	return xs_path_talk_noreply(tx, SV_XS_RM, dir, node, NULL, 0);
}
EXPORT_SYMBOL_GPL(pvbus_xs_rm);

bool pvbus_xs_exists(const char *dir, const char *node)
{
	unsigned int n;
	char **d = pvbus_xs_directory(PVBUS_XS_NO_TX, dir, node, &n);

	if (IS_ERR(d))
		return false;
	kfree(d);
	return true;
}
EXPORT_SYMBOL_GPL(pvbus_xs_exists);

int pvbus_xs_transaction_start(pvbus_xs_tx_t *tx)
{
	struct kvec vec = { .iov_base = "", .iov_len = 1 };
	char *id;
	int ret;

	id = xs_talk(PVBUS_XS_NO_TX, SV_XS_TRANSACTION_START, &vec, 1, NULL);
	if (IS_ERR(id))
		return PTR_ERR(id);
	ret = kstrtou32(id, 10, tx);
	kfree(id);
	return ret;
}
EXPORT_SYMBOL_GPL(pvbus_xs_transaction_start);

int pvbus_xs_transaction_end(pvbus_xs_tx_t tx, bool abort)
{
	struct kvec vec = { .iov_base = abort ? "F" : "T", .iov_len = 2 };
	char *r = xs_talk(tx, SV_XS_TRANSACTION_END, &vec, 1, NULL);

	if (IS_ERR(r))
		return PTR_ERR(r);
	kfree(r);
	return 0;
}
EXPORT_SYMBOL_GPL(pvbus_xs_transaction_end);

/* ---- watches ---- */

static int xs_watch_request(u32 type, struct pvbus_watch *w)
{
	char token[16];

	snprintf(token, sizeof(token), "pv%u", w->token);
	return xs_path_talk_noreply(PVBUS_XS_NO_TX, type, w->path, NULL, token,
				    strlen(token) + 1);
}

int pvbus_watch_register(struct pvbus_watch *w)
{
	int ret;

	spin_lock(&xs_watches_lock);
	w->token = ++xs_last_token;
	list_add(&w->list, &xs_watches);
	spin_unlock(&xs_watches_lock);

	ret = xs_watch_request(SV_XS_WATCH, w);
	if (ret) {
		spin_lock(&xs_watches_lock);
		list_del(&w->list);
		spin_unlock(&xs_watches_lock);
	}
	return ret;
}
EXPORT_SYMBOL_GPL(pvbus_watch_register);

void pvbus_watch_unregister(struct pvbus_watch *w)
{
	struct xs_watch_event *ev, *n;
	bool in_callback = current == xs_watcher;
	int ret;

	/* After this the reader queues no new event for w. */
	spin_lock(&xs_watches_lock);
	list_del(&w->list);
	spin_unlock(&xs_watches_lock);

	ret = xs_watch_request(SV_XS_UNWATCH, w);
	if (ret && !READ_ONCE(xs_broken))
		pr_warn("unwatch %s: %d\n", w->path, ret);

	spin_lock(&xs_events_lock);
	list_for_each_entry_safe(ev, n, &xs_events, list) {
		if (ev->watch == w) {
			list_del(&ev->list);
			kfree(ev);
		}
	}
	spin_unlock(&xs_events_lock);
	/* No event of w is queued now; wait for one being handled. */
	if (!in_callback)
		wait_event(xs_callback_done_wq, !xs_watch_running(w));
}
EXPORT_SYMBOL_GPL(pvbus_watch_unregister);

/* ---- setup ---- */

int pvbus_xs_init(void)
{
	char domid[8];
	struct kvec vec = { .iov_base = domid };
	char *home;
	int ret;

	xs_intf = memremap(pvbus_plat.store_ring_gpa, SV_PAGE_SIZE,
			   MEMREMAP_WB);
	if (!xs_intf) {
		pr_err("cannot map the store page at %#llx\n",
		       pvbus_plat.store_ring_gpa);
		return -ENOMEM;
	}
	/* Resume where the rings stand (read once; checked on every use). */
	xs_req_prod = READ_ONCE(xs_intf->req_prod);
	xs_rsp_cons = READ_ONCE(xs_intf->rsp_cons);
	xs_broken = false;
	xs_port = pvbus_plat.store_evtchn;

	xs_reader = kthread_run(xs_reader_fn, NULL, "pvbus-xs");
	if (IS_ERR(xs_reader)) {
		ret = PTR_ERR(xs_reader);
		goto err_unmap;
	}
	xs_watcher = kthread_run(xs_watch_thread_fn, NULL, "pvbus-watch");
	if (IS_ERR(xs_watcher)) {
		ret = PTR_ERR(xs_watcher);
		goto err_reader;
	}
	ret = pvbus_evtchn_bind(xs_port, xs_event, NULL, "store");
	if (ret)
		goto err_watcher;

	snprintf(domid, sizeof(domid), "%u", pvbus_plat.domid);
	vec.iov_len = strlen(domid) + 1;
	home = xs_talk(PVBUS_XS_NO_TX, SV_XS_GET_DOMAIN_PATH, &vec, 1, NULL);
	if (IS_ERR(home)) {
		ret = PTR_ERR(home);
		pr_err("store does not answer (GET_DOMAIN_PATH: %d)\n", ret);
		goto err_unbind;
	}
	pvbus_home = home;
	pr_info("store connected, home %s\n", pvbus_home);
	return 0;

err_unbind:
	pvbus_evtchn_unbind(xs_port);
err_watcher:
	kthread_stop(xs_watcher);
err_reader:
	kthread_stop(xs_reader);
err_unmap:
	memunmap(xs_intf);
	return ret;
}

void pvbus_xs_exit(void)
{
	struct xs_watch_event *ev, *n;

	WARN_ON(!list_empty(&xs_watches));
	pvbus_evtchn_unbind(xs_port);
	kthread_stop(xs_watcher);
	kthread_stop(xs_reader);
	list_for_each_entry_safe(ev, n, &xs_events, list) {
		list_del(&ev->list);
		kfree(ev);
	}
	kfree(pvbus_home);
	pvbus_home = NULL;
	memunmap(xs_intf);
}
