// SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause
/*
 * pvblk: block front end for Splitvisor virtual disks (device/vbd/<id>),
 * exposed as /dev/pvd[a-z]... through blk-mq.
 *
 * One blkif ring per hardware queue (Xen's multi-queue layout: top-level
 * keys for one queue, queue-<n>/ for several), each with its own event
 * channel and lock.  A request's ring id is its blk-mq tag, and the queue
 * depth is the ring size, so a request always finds a free slot.
 *
 * Data never leaves the driver's own pages: every ring slot owns a set of
 * data pages (and, with indirect segments, descriptor pages) granted to
 * the back end once, when the ring is set up.  Writes are copied into them
 * before the request goes out, reads copied out after the answer.  The back
 * end therefore never maps a page-cache page, a misbehaving back end can
 * only ever scribble on pages it was given, and the grants can stay put
 * for the ring's lifetime (we offer feature-persistent).  Pages are
 * revoked and freed only after the disk is gone, and a page the back end
 * still maps is parked by pvbus until it lets go.
 *
 * Responses are hostile input: the id must name a slot with a request in
 * flight and the operation must match; anything else breaks the ring,
 * fails its requests and tells the back end we are closing.
 *
 * Flush: with feature-flush-cache the disk has a volatile write cache and
 * REQ_OP_FLUSH becomes BLKIF_OP_FLUSH_DISKCACHE; FUA writes are left to the
 * block layer, which follows them with a flush.  Discard: with
 * feature-discard, REQ_OP_DISCARD becomes BLKIF_OP_DISCARD.  Read-only
 * disks (info bit VDISK_READONLY or mode "r") refuse writes and discards.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/cpumask.h>
#include <linux/highmem.h>
#include <linux/idr.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/workqueue.h>
#include <splitvisor/pvbus.h>
#include <splitvisor/pvring.h>

#define PVBLK_MINORS		16
#define PVBLK_MAX_RING_ORDER	4

static unsigned int max_queues = 4;
module_param(max_queues, uint, 0444);
MODULE_PARM_DESC(max_queues, "Most hardware queues (rings) per disk (default 4)");

static unsigned int max_indirect_segments = 32;
module_param(max_indirect_segments, uint, 0444);
MODULE_PARM_DESC(max_indirect_segments,
		 "Most 4 KiB segments per request with indirect descriptors (default 32; 11 or less: no indirect)");

static unsigned int ring_page_order;
module_param(ring_page_order, uint, 0444);
MODULE_PARM_DESC(ring_page_order, "log2 of pages per ring (default 0, at most 4)");

static int pvblk_major;
static DEFINE_IDA(pvblk_index_ida);

/* A page of ours granted to the back end. */
struct pvblk_gpage {
	struct page *page;	/* NULL: not allocated */
	pvbus_gref_t ref;
};

struct pvblk_slot {
	struct request *rq;	/* in flight, or NULL */
	u8 operation;		/* what we sent */
	u8 indirect_op;		/* and, for BLKIF_OP_INDIRECT, its direction */
	struct pvblk_gpage *data;	/* max_segs pages */
	struct pvblk_gpage indirect[SV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
};

struct pvblk_info;

struct pvblk_queue {
	struct pvblk_info *info;
	unsigned int index;
	spinlock_t lock;	/* ring, slots, live, broken */
	struct pvring_front ring;
	struct pvblk_gpage ring_pages[1 << PVBLK_MAX_RING_ORDER];
	struct pvblk_slot *slots;	/* ring.size of them */
	unsigned int evtchn;
	bool evtchn_allocated;
	bool evtchn_bound;
	bool live;		/* the disk is connected: take requests */
	bool broken;		/* the back end broke the protocol */
	char name[32];
};

/* Per-request driver data. */
struct pvblk_req {
	struct pvblk_slot *slot;
	blk_status_t status;
};

struct pvblk_info {
	struct pvbus_device *pdev;
	struct mutex mutex;	/* the handshake: setup, connect, teardown */
	int index;		/* pvd<index as letters> */
	u16 handle;		/* the virtual device id */

	/* Valid from setup (InitWait) to teardown. */
	struct pvblk_queue *queues;
	unsigned int nr_queues;
	unsigned int ring_order;
	unsigned int max_segs;		/* per request */
	unsigned int nr_indirect;	/* descriptor pages per request, 0: direct */

	/* Valid from connect (back end Connected) to teardown. */
	struct blk_mq_tag_set tag_set;
	bool tag_set_allocated;
	struct gendisk *gd;
	u64 sectors;
	unsigned int sector_size;
	bool readonly;
	bool feature_flush;
	bool feature_discard;

	struct work_struct fatal_work;	/* a ring broke in an interrupt */
};

static int pvblk_grant_page(struct pvblk_gpage *g, pvbus_domid_t backend,
			    bool readonly, struct page *page)
{
	if (!page)
		page = alloc_page(GFP_KERNEL | __GFP_ZERO);
	if (!page)
		return -ENOMEM;
	if (pvbus_gnttab_alloc_refs(1, &g->ref)) {
		__free_page(page);
		return -ENOSPC;
	}
	pvbus_gnttab_grant(g->ref, backend, page_to_pfn(page), readonly);
	g->page = page;
	return 0;
}

/* Revokes and frees, now or (if the back end still maps it) later. */
static void pvblk_ungrant_page(struct pvblk_gpage *g)
{
	if (!g->page)
		return;
	pvbus_gnttab_end_access_free(g->ref, g->page);
	g->page = NULL;
}

/* ---- the data path ---- */

/* Copies a request's data between its bio pages and its slot's pages. */
static void pvblk_copy(struct request *rq, struct pvblk_slot *slot,
		       bool to_slot)
{
	struct req_iterator iter;
	struct bio_vec bv;
	size_t off = 0;

	rq_for_each_segment(bv, rq, iter) {
		char *p = bvec_kmap_local(&bv);
		unsigned int done = 0;

		while (done < bv.bv_len) {
			char *s = page_address(slot->data[off / PAGE_SIZE].page) +
				  off % PAGE_SIZE;
			unsigned int n = min_t(unsigned int, bv.bv_len - done,
					       PAGE_SIZE - off % PAGE_SIZE);

			if (to_slot)
				memcpy(s, p + done, n);
			else
				memcpy(p + done, s, n);
			done += n;
			off += n;
		}
		kunmap_local(p);
		if (!to_slot)
			flush_dcache_page(bv.bv_page);
	}
}

/*
 * Fills @n descriptors for segments @first.. of @bytes of data packed into
 * the slot's pages from the start (every segment starts at sector 0).
 */
static void pvblk_segments(struct pvblk_slot *slot, unsigned int bytes,
			   unsigned int first, struct sv_blkif_segment *seg,
			   unsigned int n)
{
	unsigned int k, s, len;

	for (k = 0; k < n; k++) {
		s = first + k;
		len = min_t(unsigned int, bytes - s * PAGE_SIZE, PAGE_SIZE);
		seg[k].gref = slot->data[s].ref;
		seg[k].first_sect = 0;
		seg[k].last_sect = len / SV_SECTOR_SIZE - 1;
		seg[k]._pad = 0;
	}
}

/* Builds the ring request for @rq (the caller holds q->lock). */
static blk_status_t pvblk_build(struct pvblk_queue *q, struct pvblk_slot *slot,
				struct request *rq, void *ring_slot)
{
	struct pvblk_info *info = q->info;
	union {
		struct sv_blkif_request rw;
		struct sv_blkif_request_discard discard;
		struct sv_blkif_request_indirect ind;
	} r;
	unsigned int bytes, nseg, i;

	memset(&r, 0, sizeof(r));
	switch (req_op(rq)) {
	case REQ_OP_FLUSH:
		if (!info->feature_flush)
			return BLK_STS_NOTSUPP;
		r.rw.operation = SV_BLKIF_OP_FLUSH_DISKCACHE;
		r.rw.handle = info->handle;
		r.rw.id = rq->tag;
		break;
	case REQ_OP_DISCARD:
		if (!info->feature_discard)
			return BLK_STS_NOTSUPP;
		r.discard.operation = SV_BLKIF_OP_DISCARD;
		r.discard.handle = info->handle;
		r.discard.id = rq->tag;
		r.discard.sector_number = blk_rq_pos(rq);
		r.discard.nr_sectors = blk_rq_sectors(rq);
		break;
	case REQ_OP_READ:
	case REQ_OP_WRITE:
		bytes = blk_rq_bytes(rq);
		nseg = DIV_ROUND_UP(bytes, PAGE_SIZE);
		if (!bytes || bytes % SV_SECTOR_SIZE || nseg > info->max_segs)
			return BLK_STS_IOERR;
		if (nseg <= SV_BLKIF_MAX_SEGMENTS_PER_REQUEST) {
			r.rw.operation = rq_data_dir(rq) == WRITE ?
					 SV_BLKIF_OP_WRITE : SV_BLKIF_OP_READ;
			r.rw.nr_segments = nseg;
			r.rw.handle = info->handle;
			r.rw.id = rq->tag;
			r.rw.sector_number = blk_rq_pos(rq);
			pvblk_segments(slot, bytes, 0, r.rw.seg, nseg);
			break;
		}
		r.ind.operation = SV_BLKIF_OP_INDIRECT;
		r.ind.indirect_op = rq_data_dir(rq) == WRITE ?
				    SV_BLKIF_OP_WRITE : SV_BLKIF_OP_READ;
		r.ind.nr_segments = nseg;
		r.ind.handle = info->handle;
		r.ind.id = rq->tag;
		r.ind.sector_number = blk_rq_pos(rq);
		for (i = 0; i * SV_BLKIF_SEGMENTS_PER_INDIRECT_PAGE < nseg; i++) {
			unsigned int first = i * SV_BLKIF_SEGMENTS_PER_INDIRECT_PAGE;

			pvblk_segments(slot, bytes, first,
				       page_address(slot->indirect[i].page),
				       min_t(unsigned int, nseg - first,
					     SV_BLKIF_SEGMENTS_PER_INDIRECT_PAGE));
			r.ind.indirect_grefs[i] = slot->indirect[i].ref;
		}
		break;
	default:
		return BLK_STS_NOTSUPP;
	}
	slot->operation = r.rw.operation;
	slot->indirect_op = r.rw.operation == SV_BLKIF_OP_INDIRECT ?
			    r.ind.indirect_op : 0;
	/* One copy into shared memory; the back end copies it out once. */
	memcpy(ring_slot, &r, SV_BLKIF_SLOT_SIZE);
	return BLK_STS_OK;
}

static blk_status_t pvblk_queue_rq(struct blk_mq_hw_ctx *hctx,
				   const struct blk_mq_queue_data *bd)
{
	struct pvblk_queue *q = hctx->driver_data;
	struct pvblk_info *info = q->info;
	struct request *rq = bd->rq;
	struct pvblk_req *pr = blk_mq_rq_to_pdu(rq);
	struct pvblk_slot *slot;
	bool notify = false;
	unsigned long flags;
	blk_status_t st;

	blk_mq_start_request(rq);
	if (info->readonly && op_is_write(req_op(rq)))
		return BLK_STS_IOERR;
	if (WARN_ON_ONCE(rq->tag < 0 || rq->tag >= q->ring.size))
		return BLK_STS_IOERR;
	slot = &q->slots[rq->tag];
	pr->slot = slot;
	pr->status = BLK_STS_IOERR;
	/* The slot's pages are this tag's alone: copy without the lock. */
	if (req_op(rq) == REQ_OP_WRITE &&
	    blk_rq_bytes(rq) <= info->max_segs * PAGE_SIZE)
		pvblk_copy(rq, slot, true);

	spin_lock_irqsave(&q->lock, flags);
	if (!q->live || q->broken) {
		st = BLK_STS_IOERR;
		goto out;
	}
	/* Depth == ring size and a slot frees before its tag: never full. */
	if (WARN_ON_ONCE(slot->rq || !pvring_free(&q->ring))) {
		st = BLK_STS_IOERR;
		goto out;
	}
	st = pvblk_build(q, slot, rq, pvring_slot(&q->ring,
						  q->ring.req_prod_pvt));
	if (st != BLK_STS_OK)
		goto out;
	q->ring.req_prod_pvt++;
	slot->rq = rq;
	if (bd->last)
		notify = pvring_push_requests(&q->ring);
out:
	spin_unlock_irqrestore(&q->lock, flags);
	if (notify)
		pvbus_evtchn_notify(q->evtchn);
	return st;
}

static void pvblk_commit_rqs(struct blk_mq_hw_ctx *hctx)
{
	struct pvblk_queue *q = hctx->driver_data;
	unsigned long flags;
	bool notify;

	spin_lock_irqsave(&q->lock, flags);
	notify = q->live && pvring_push_requests(&q->ring);
	spin_unlock_irqrestore(&q->lock, flags);
	if (notify)
		pvbus_evtchn_notify(q->evtchn);
}

static void pvblk_complete_rq(struct request *rq)
{
	struct pvblk_req *pr = blk_mq_rq_to_pdu(rq);

	if (pr->status == BLK_STS_OK && req_op(rq) == REQ_OP_READ)
		pvblk_copy(rq, pr->slot, false);
	blk_mq_end_request(rq, pr->status);
}

static int pvblk_init_hctx(struct blk_mq_hw_ctx *hctx, void *data,
			   unsigned int index)
{
	struct pvblk_info *info = data;

	hctx->driver_data = &info->queues[index];
	return 0;
}

static const struct blk_mq_ops pvblk_mq_ops = {
	.queue_rq = pvblk_queue_rq,
	.commit_rqs = pvblk_commit_rqs,
	.complete = pvblk_complete_rq,
	.init_hctx = pvblk_init_hctx,
};

/*
 * Moves every request in flight on @q to @done, failed (the caller holds
 * q->lock and completes them after dropping it).
 */
static void pvblk_fail_in_flight(struct pvblk_queue *q, struct list_head *done)
{
	unsigned int i;

	for (i = 0; i < q->ring.size; i++) {
		struct request *rq = q->slots[i].rq;

		if (!rq)
			continue;
		q->slots[i].rq = NULL;
		((struct pvblk_req *)blk_mq_rq_to_pdu(rq))->status =
			BLK_STS_IOERR;
		list_add_tail(&rq->queuelist, done);
	}
}

/* Completes the requests pvblk took off a ring, without its lock. */
static void pvblk_complete_list(struct list_head *done)
{
	struct request *rq, *n;

	list_for_each_entry_safe(rq, n, done, queuelist) {
		list_del_init(&rq->queuelist);
		blk_mq_complete_request(rq);
	}
}

static blk_status_t pvblk_status(const struct sv_blkif_response *rsp)
{
	switch (rsp->status) {
	case SV_BLKIF_RSP_OKAY:
		return BLK_STS_OK;
	case SV_BLKIF_RSP_EOPNOTSUPP:
		return BLK_STS_NOTSUPP;
	default:
		return BLK_STS_IOERR;
	}
}

/*
 * Does @rsp answer what @slot has in flight?  An indirect request is
 * answered with BLKIF_OP_INDIRECT (pv-protocol) or, as Xen's back ends do,
 * with its direction.
 */
static bool pvblk_response_matches(const struct pvblk_slot *slot,
				   const struct sv_blkif_response *rsp)
{
	if (!slot->rq)
		return false;
	return rsp->operation == slot->operation ||
	       (slot->operation == SV_BLKIF_OP_INDIRECT &&
		rsp->operation == slot->indirect_op);
}

/*
 * Consumes responses, moving their requests to @done; false if the back
 * end broke the protocol.
 */
static bool pvblk_take_responses(struct pvblk_queue *q, struct list_head *done)
{
	struct sv_blkif_response rsp;
	struct pvblk_slot *slot;
	struct request *rq;
	u32 prod;

	do {
		if (pvring_rsp_prod(&q->ring, &prod)) {
			pr_warn_ratelimited("%s: response index %u out of range\n",
					    q->name,
					    READ_ONCE(q->ring.sring->rsp_prod));
			return false;
		}
		while (q->ring.rsp_cons != prod) {
			memcpy(&rsp, pvring_slot(&q->ring, q->ring.rsp_cons),
			       sizeof(rsp));
			q->ring.rsp_cons++;
			if (rsp.id >= q->ring.size ||
			    !pvblk_response_matches(&q->slots[rsp.id], &rsp)) {
				pr_warn_ratelimited("%s: bad response id %llu op %u\n",
						    q->name, rsp.id,
						    rsp.operation);
				return false;
			}
			slot = &q->slots[rsp.id];
			rq = slot->rq;
			slot->rq = NULL;
			if (rsp.status != SV_BLKIF_RSP_OKAY)
				pr_warn_ratelimited("%s: op %u at sector %llu: status %d\n",
						    q->name, rsp.operation,
						    (unsigned long long)blk_rq_pos(rq),
						    rsp.status);
			((struct pvblk_req *)blk_mq_rq_to_pdu(rq))->status =
				pvblk_status(&rsp);
			list_add_tail(&rq->queuelist, done);
		}
	} while (pvring_final_check(&q->ring));
	return true;
}

static void pvblk_interrupt(unsigned int port, void *data)
{
	struct pvblk_queue *q = data;
	LIST_HEAD(done);

	spin_lock(&q->lock);
	if (q->live && !q->broken && !pvblk_take_responses(q, &done)) {
		q->broken = true;
		pvblk_fail_in_flight(q, &done);
		schedule_work(&q->info->fatal_work);
	}
	spin_unlock(&q->lock);
	/* Completion may copy read data: not under the ring lock. */
	pvblk_complete_list(&done);
}

static void pvblk_fatal_work(struct work_struct *work)
{
	struct pvblk_info *info = container_of(work, struct pvblk_info,
					       fatal_work);

	/* The handshake state is the mutex's: no racing a state change. */
	mutex_lock(&info->mutex);
	pvbus_dev_fatal(info->pdev, -EIO, "back end broke the ring protocol");
	mutex_unlock(&info->mutex);
}

/* ---- setup and teardown ---- */

static void pvblk_free_queue(struct pvblk_info *info, struct pvblk_queue *q)
{
	unsigned int i, j;

	if (q->evtchn_bound)
		pvbus_evtchn_unbind(q->evtchn);
	q->evtchn_bound = false;
	if (q->evtchn_allocated)
		pvbus_evtchn_close(q->evtchn);
	q->evtchn_allocated = false;
	if (q->slots) {
		for (i = 0; i < q->ring.size; i++) {
			struct pvblk_slot *slot = &q->slots[i];

			WARN_ON(slot->rq);
			for (j = 0; slot->data && j < info->max_segs; j++)
				pvblk_ungrant_page(&slot->data[j]);
			kfree(slot->data);
			for (j = 0; j < info->nr_indirect; j++)
				pvblk_ungrant_page(&slot->indirect[j]);
		}
		kfree(q->slots);
		q->slots = NULL;
	}
	for (i = 0; i < ARRAY_SIZE(q->ring_pages); i++)
		pvblk_ungrant_page(&q->ring_pages[i]);
}

static void pvblk_free_queues(struct pvblk_info *info)
{
	unsigned int i;

	for (i = 0; info->queues && i < info->nr_queues; i++)
		pvblk_free_queue(info, &info->queues[i]);
	kfree(info->queues);
	info->queues = NULL;
	info->nr_queues = 0;
}

static int pvblk_setup_queue(struct pvblk_info *info, struct pvblk_queue *q)
{
	struct pvbus_device *pdev = info->pdev;
	pvbus_domid_t be = pdev->otherend_id;
	unsigned int i, j, pages = 1U << info->ring_order;
	struct page *ring;
	int ret;

	spin_lock_init(&q->lock);
	snprintf(q->name, sizeof(q->name), "%s-q%u", dev_name(&pdev->dev),
		 q->index);

	/* The back end wants a ring's pages contiguous in guest memory. */
	ring = alloc_pages(GFP_KERNEL | __GFP_ZERO, info->ring_order);
	if (!ring)
		return -ENOMEM;
	if (info->ring_order)
		split_page(ring, info->ring_order);
	for (i = 0; i < pages; i++) {
		ret = pvblk_grant_page(&q->ring_pages[i], be, false, ring + i);
		if (ret) {
			/* Pages not granted yet are still ours to free. */
			for (j = i + 1; j < pages; j++)
				__free_page(ring + j);
			return ret;
		}
	}
	pvring_init(&q->ring, page_address(ring), pages, SV_BLKIF_SLOT_SIZE);

	q->slots = kcalloc(q->ring.size, sizeof(*q->slots), GFP_KERNEL);
	if (!q->slots)
		return -ENOMEM;
	for (i = 0; i < q->ring.size; i++) {
		struct pvblk_slot *slot = &q->slots[i];

		slot->data = kcalloc(info->max_segs, sizeof(*slot->data),
				     GFP_KERNEL);
		if (!slot->data)
			return -ENOMEM;
		for (j = 0; j < info->max_segs; j++) {
			ret = pvblk_grant_page(&slot->data[j], be, false, NULL);
			if (ret)
				return ret;
		}
		for (j = 0; j < info->nr_indirect; j++) {
			ret = pvblk_grant_page(&slot->indirect[j], be, true,
					       NULL);
			if (ret)
				return ret;
		}
	}

	ret = pvbus_evtchn_alloc_unbound(be, &q->evtchn);
	if (ret)
		return ret;
	q->evtchn_allocated = true;
	ret = pvbus_evtchn_bind(q->evtchn, pvblk_interrupt, q, q->name);
	if (ret)
		return ret;
	q->evtchn_bound = true;
	return 0;
}

/* Writes one queue's ring references and event channel under @dir. */
static int pvblk_write_queue(pvbus_xs_tx_t tx, struct pvblk_info *info,
			     struct pvblk_queue *q, const char *dir)
{
	unsigned int i;
	char key[16];
	int ret;

	if (!info->ring_order) {
		ret = pvbus_xs_printf(tx, dir, SV_BLKIF_KEY_RING_REF, "%u",
				      q->ring_pages[0].ref);
		if (ret)
			return ret;
	}
	for (i = 0; info->ring_order && i < 1U << info->ring_order; i++) {
		snprintf(key, sizeof(key), SV_BLKIF_KEY_RING_REF "%u", i);
		ret = pvbus_xs_printf(tx, dir, key, "%u", q->ring_pages[i].ref);
		if (ret)
			return ret;
	}
	return pvbus_xs_printf(tx, dir, SV_BLKIF_KEY_EVENT_CHANNEL, "%u",
			       q->evtchn);
}

static int pvblk_publish(struct pvblk_info *info)
{
	const char *node = info->pdev->nodename;
	pvbus_xs_tx_t tx;
	unsigned int i;
	char *dir;
	int ret;

again:
	ret = pvbus_xs_transaction_start(&tx);
	if (ret)
		return ret;
	if (info->ring_order) {
		ret = pvbus_xs_printf(tx, node, SV_BLKIF_KEY_RING_PAGE_ORDER,
				      "%u", info->ring_order);
		if (ret)
			goto abort;
	}
	if (info->nr_queues == 1) {
		ret = pvblk_write_queue(tx, info, &info->queues[0], node);
		if (ret)
			goto abort;
	} else {
		ret = pvbus_xs_printf(tx, node,
				      SV_BLKIF_KEY_MULTI_QUEUE_NUM_QUEUES,
				      "%u", info->nr_queues);
		for (i = 0; !ret && i < info->nr_queues; i++) {
			dir = kasprintf(GFP_KERNEL, "%s/queue-%u", node, i);
			if (!dir) {
				ret = -ENOMEM;
				break;
			}
			ret = pvblk_write_queue(tx, info, &info->queues[i], dir);
			kfree(dir);
		}
		if (ret)
			goto abort;
	}
	/* Our grants stay put for the ring's lifetime. */
	ret = pvbus_xs_write(tx, node, SV_BLKIF_KEY_FEATURE_PERSISTENT, "1");
	if (ret)
		goto abort;
	ret = pvbus_xs_transaction_end(tx, false);
	if (ret == -EAGAIN)
		goto again;
	return ret;
abort:
	pvbus_xs_transaction_end(tx, true);
	return ret;
}

/* Back end in InitWait: negotiate, build the rings, publish them. */
static int pvblk_setup(struct pvblk_info *info)
{
	const char *be = info->pdev->otherend;
	unsigned int nq, order, indirect, i;
	int ret;

	nq = pvbus_xs_read_uint_default(be, SV_BLKIF_KEY_MULTI_QUEUE_MAX_QUEUES,
					1);
	nq = max(min3(nq, max_queues, num_online_cpus()), 1U);
	order = pvbus_xs_read_uint_default(be, SV_BLKIF_KEY_MAX_RING_PAGE_ORDER,
					   0);
	order = min3(order, ring_page_order, (unsigned int)PVBLK_MAX_RING_ORDER);
	indirect = pvbus_xs_read_uint_default(be,
			SV_BLKIF_KEY_FEATURE_MAX_INDIRECT_SEGMENTS, 0);
	indirect = min3(indirect, max_indirect_segments,
			(unsigned int)SV_BLKIF_MAX_INDIRECT_SEGMENTS);

	info->nr_queues = 0;
	info->ring_order = order;
	if (indirect > SV_BLKIF_MAX_SEGMENTS_PER_REQUEST) {
		info->max_segs = indirect;
		info->nr_indirect = DIV_ROUND_UP(indirect,
					SV_BLKIF_SEGMENTS_PER_INDIRECT_PAGE);
	} else {
		info->max_segs = SV_BLKIF_MAX_SEGMENTS_PER_REQUEST;
		info->nr_indirect = 0;
	}

	info->queues = kcalloc(nq, sizeof(*info->queues), GFP_KERNEL);
	if (!info->queues)
		return -ENOMEM;
	info->nr_queues = nq;
	for (i = 0; i < nq; i++) {
		info->queues[i].info = info;
		info->queues[i].index = i;
		ret = pvblk_setup_queue(info, &info->queues[i]);
		if (ret)
			goto err;
	}
	ret = pvblk_publish(info);
	if (ret)
		goto err;
	dev_info(&info->pdev->dev,
		 "%u queue(s) of %u slots, %u segments per request\n", nq,
		 info->queues[0].ring.size, info->max_segs);
	return 0;
err:
	pvblk_free_queues(info);
	return ret;
}

static void pvblk_disk_name(char *buf, int index)
{
	char suffix[8];
	char *p = suffix + sizeof(suffix) - 1;

	/* a..z, aa..zz, ... as sd does. */
	*p = '\0';
	do {
		*--p = 'a' + index % 26;
		index = index / 26 - 1;
	} while (index >= 0 && p > suffix);
	snprintf(buf, DISK_NAME_LEN, "pvd%s", p);
}

static const struct block_device_operations pvblk_fops = {
	.owner = THIS_MODULE,
};

static int pvblk_read_disk(struct pvblk_info *info)
{
	const char *be = info->pdev->otherend;
	unsigned int vinfo = 0;
	char *s;
	int ret;

	s = pvbus_xs_read(PVBUS_XS_NO_TX, be, SV_BLKIF_KEY_SECTORS, NULL);
	if (IS_ERR(s))
		return PTR_ERR(s);
	ret = kstrtou64(strim(s), 10, &info->sectors);
	kfree(s);
	if (ret)
		return ret;
	info->sector_size = pvbus_xs_read_uint_default(be,
					SV_BLKIF_KEY_SECTOR_SIZE, 512);
	if (info->sector_size < SV_SECTOR_SIZE ||
	    info->sector_size > PAGE_SIZE ||
	    !is_power_of_2(info->sector_size))
		return -EINVAL;
	pvbus_xs_read_uint(PVBUS_XS_NO_TX, be, SV_BLKIF_KEY_INFO, &vinfo);
	info->readonly = vinfo & SV_VDISK_READONLY;
	s = pvbus_xs_read(PVBUS_XS_NO_TX, be, "mode", NULL);
	if (!IS_ERR(s)) {
		if (!strcmp(s, "r"))
			info->readonly = true;
		kfree(s);
	}
	info->feature_flush = !info->readonly &&
		pvbus_xs_read_uint_default(be, SV_BLKIF_KEY_FEATURE_FLUSH_CACHE, 0);
	info->feature_discard = !info->readonly &&
		pvbus_xs_read_uint_default(be, SV_BLKIF_KEY_FEATURE_DISCARD, 0);
	return 0;
}

/* Back end Connected: create the disk. */
static int pvblk_connect(struct pvblk_info *info)
{
	struct blk_mq_tag_set *set = &info->tag_set;
	struct request_queue *rq;
	struct gendisk *gd;
	unsigned long flags;
	unsigned int i;
	int ret;

	ret = pvblk_read_disk(info);
	if (ret)
		return ret;

	memset(set, 0, sizeof(*set));
	set->ops = &pvblk_mq_ops;
	set->nr_hw_queues = info->nr_queues;
	set->queue_depth = info->queues[0].ring.size;
	set->numa_node = NUMA_NO_NODE;
	set->flags = BLK_MQ_F_SHOULD_MERGE;
	set->cmd_size = sizeof(struct pvblk_req);
	set->driver_data = info;
	ret = blk_mq_alloc_tag_set(set);
	if (ret)
		return ret;
	info->tag_set_allocated = true;

	gd = blk_mq_alloc_disk(set, info);
	if (IS_ERR(gd)) {
		ret = PTR_ERR(gd);
		goto err_tags;
	}
	gd->major = pvblk_major;
	gd->first_minor = info->index * PVBLK_MINORS;
	gd->minors = PVBLK_MINORS;
	gd->fops = &pvblk_fops;
	gd->private_data = info;
	pvblk_disk_name(gd->disk_name, info->index);
	set_capacity(gd, info->sectors);

	rq = gd->queue;
	blk_queue_logical_block_size(rq, info->sector_size);
	blk_queue_physical_block_size(rq, info->sector_size);
	blk_queue_max_hw_sectors(rq, info->max_segs * (PAGE_SIZE >> SECTOR_SHIFT));
	blk_queue_max_segments(rq, info->max_segs);
	blk_queue_max_segment_size(rq, PAGE_SIZE);
	blk_queue_segment_boundary(rq, PAGE_SIZE - 1);
	blk_queue_write_cache(rq, info->feature_flush, false);
	if (info->feature_discard) {
		rq->limits.discard_granularity = info->sector_size;
		blk_queue_max_discard_sectors(rq, min_t(u64, info->sectors,
							UINT_MAX));
	}
	set_disk_ro(gd, info->readonly);
	info->gd = gd;

	for (i = 0; i < info->nr_queues; i++) {
		spin_lock_irqsave(&info->queues[i].lock, flags);
		info->queues[i].live = true;
		spin_unlock_irqrestore(&info->queues[i].lock, flags);
	}
	ret = device_add_disk(&info->pdev->dev, gd, NULL);
	if (ret)
		goto err_disk;
	dev_info(&info->pdev->dev, "%s: %llu sectors of %u bytes%s%s%s\n",
		 gd->disk_name, info->sectors, info->sector_size,
		 info->readonly ? ", read-only" : "",
		 info->feature_flush ? ", flush" : "",
		 info->feature_discard ? ", discard" : "");
	return 0;

err_disk:
	for (i = 0; i < info->nr_queues; i++) {
		spin_lock_irqsave(&info->queues[i].lock, flags);
		info->queues[i].live = false;
		spin_unlock_irqrestore(&info->queues[i].lock, flags);
	}
	info->gd = NULL;
	put_disk(gd);
err_tags:
	blk_mq_free_tag_set(set);
	info->tag_set_allocated = false;
	return ret;
}

/* Back end Connected again: the disk may have grown or shrunk. */
static void pvblk_resize(struct pvblk_info *info)
{
	char *s;
	u64 sectors;

	s = pvbus_xs_read(PVBUS_XS_NO_TX, info->pdev->otherend,
			  SV_BLKIF_KEY_SECTORS, NULL);
	if (IS_ERR(s))
		return;
	if (!kstrtou64(strim(s), 10, &sectors) && sectors != info->sectors &&
	    info->gd) {
		info->sectors = sectors;
		set_capacity_and_notify(info->gd, sectors);
	}
	kfree(s);
}

/* Undoes setup and connect, whichever happened; the caller holds mutex. */
static void pvblk_teardown(struct pvblk_info *info)
{
	unsigned long flags;
	unsigned int i;

	/* No new requests reach the rings. */
	for (i = 0; i < info->nr_queues; i++) {
		spin_lock_irqsave(&info->queues[i].lock, flags);
		info->queues[i].live = false;
		spin_unlock_irqrestore(&info->queues[i].lock, flags);
	}
	/* No more responses: afterwards no handler runs. */
	for (i = 0; i < info->nr_queues; i++) {
		if (info->queues[i].evtchn_bound)
			pvbus_evtchn_unbind(info->queues[i].evtchn);
		info->queues[i].evtchn_bound = false;
	}
	/* Requests the back end never answered fail. */
	for (i = 0; i < info->nr_queues; i++) {
		LIST_HEAD(done);

		spin_lock_irqsave(&info->queues[i].lock, flags);
		if (info->queues[i].slots)
			pvblk_fail_in_flight(&info->queues[i], &done);
		spin_unlock_irqrestore(&info->queues[i].lock, flags);
		pvblk_complete_list(&done);
	}
	/* Deleting the disk drains it: no request uses a slot after this. */
	if (info->gd) {
		blk_mark_disk_dead(info->gd);
		del_gendisk(info->gd);
		put_disk(info->gd);
		info->gd = NULL;
	}
	if (info->tag_set_allocated) {
		blk_mq_free_tag_set(&info->tag_set);
		info->tag_set_allocated = false;
	}
	pvblk_free_queues(info);
}

static void pvblk_backend_changed(struct pvbus_device *pdev,
				  enum pvbus_state backend)
{
	struct pvblk_info *info = dev_get_drvdata(&pdev->dev);
	int ret;

	mutex_lock(&info->mutex);
	switch (backend) {
	case PVBUS_STATE_INIT_WAIT:
		/* From Closed too: the back end came back for another round. */
		if (pdev->state != PVBUS_STATE_INITIALISING &&
		    pdev->state != PVBUS_STATE_CLOSED)
			break;
		ret = pvblk_setup(info);
		if (ret) {
			pvbus_dev_fatal(pdev, ret, "setting up the rings");
			break;
		}
		pvbus_switch_state(pdev, PVBUS_STATE_INITIALISED);
		break;
	case PVBUS_STATE_CONNECTED:
		if (pdev->state == PVBUS_STATE_CONNECTED) {
			pvblk_resize(info);
			break;
		}
		if (pdev->state != PVBUS_STATE_INITIALISED)
			break;
		ret = pvblk_connect(info);
		if (ret) {
			pvbus_dev_fatal(pdev, ret, "creating the disk");
			break;
		}
		pvbus_switch_state(pdev, PVBUS_STATE_CONNECTED);
		break;
	case PVBUS_STATE_CLOSING:
	case PVBUS_STATE_CLOSED:
		if (pdev->state == PVBUS_STATE_CLOSED)
			break;
		pvblk_teardown(info);
		pvbus_switch_state(pdev, PVBUS_STATE_CLOSED);
		break;
	default:
		/* Unknown (not written yet), Initialising, ...: wait. */
		break;
	}
	mutex_unlock(&info->mutex);
}

static int pvblk_probe(struct pvbus_device *pdev)
{
	struct pvblk_info *info;
	const char *id;
	u16 handle = 0;
	int index;

	id = strrchr(pdev->nodename, '/');
	if (!id || kstrtou16(id + 1, 10, &handle))
		dev_warn(&pdev->dev, "device id in %s is not a number\n",
			 pdev->nodename);

	index = ida_alloc_max(&pvblk_index_ida,
			      (1U << MINORBITS) / PVBLK_MINORS - 1, GFP_KERNEL);
	if (index < 0)
		return index;
	info = kzalloc(sizeof(*info), GFP_KERNEL);
	if (!info) {
		ida_free(&pvblk_index_ida, index);
		return -ENOMEM;
	}
	info->pdev = pdev;
	info->index = index;
	info->handle = handle;
	mutex_init(&info->mutex);
	INIT_WORK(&info->fatal_work, pvblk_fatal_work);
	dev_set_drvdata(&pdev->dev, info);
	return 0;
}

static void pvblk_remove(struct pvbus_device *pdev)
{
	struct pvblk_info *info = dev_get_drvdata(&pdev->dev);

	mutex_lock(&info->mutex);
	pvblk_teardown(info);
	mutex_unlock(&info->mutex);
	/* Handlers are unbound: nothing queues the work any more. */
	cancel_work_sync(&info->fatal_work);
	dev_set_drvdata(&pdev->dev, NULL);
	ida_free(&pvblk_index_ida, info->index);
	kfree(info);
}

static struct pvbus_driver pvblk_driver = {
	.devicetype = "vbd",
	.probe = pvblk_probe,
	.otherend_changed = pvblk_backend_changed,
	.remove = pvblk_remove,
};

static int __init pvblk_init(void)
{
	int ret;

	if (max_queues < 1)
		max_queues = 1;
	if (ring_page_order > PVBLK_MAX_RING_ORDER)
		ring_page_order = PVBLK_MAX_RING_ORDER;
	pvblk_major = register_blkdev(0, "pvd");
	if (pvblk_major < 0)
		return pvblk_major;
	ret = pvbus_register_driver(&pvblk_driver);
	if (ret)
		unregister_blkdev(pvblk_major, "pvd");
	return ret;
}

static void __exit pvblk_exit(void)
{
	pvbus_unregister_driver(&pvblk_driver);
	unregister_blkdev(pvblk_major, "pvd");
	ida_destroy(&pvblk_index_ida);
}

module_init(pvblk_init);
module_exit(pvblk_exit);

MODULE_DESCRIPTION("Splitvisor block front end (blk-mq over blkif rings)");
MODULE_AUTHOR("The Splitvisor authors");
MODULE_LICENSE("Dual BSD/GPL");
MODULE_ALIAS("splitvisor:vbd");
