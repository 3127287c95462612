/* SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause */
/*
 * The front end of a shared request/response ring (pv-protocol's ring.rs,
 * Xen's ring.h): a 64-byte header {req_prod, req_event, rsp_prod,
 * rsp_event} and a power-of-two array of slots, each holding a request or,
 * once answered, its response.
 *
 * The back end is hostile: our indices live here, privately, and are only
 * ever written to the shared header; the back end's rsp_prod is checked
 * every time it is read (it may not answer more requests than we
 * published), and each response is copied out of its slot once by the
 * caller.  The caller serialises all calls on one ring.
 */
#ifndef SPLITVISOR_PVRING_H
#define SPLITVISOR_PVRING_H

#include <linux/compiler.h>
#include <linux/log2.h>
#include <linux/types.h>
#include <asm/barrier.h>
#include <splitvisor/abi.h>

struct pvring_front {
	struct sv_sring_header *sring;
	u8 *slots;
	u32 size;		/* slots, a power of two */
	u32 slot_size;
	u32 req_prod_pvt;	/* requests written */
	u32 req_prod;		/* requests published */
	u32 rsp_cons;		/* responses consumed */
};

/* Slots in a ring of @pages pages whose slots are @slot_size bytes. */
static inline u32 pvring_slots(unsigned int pages, u32 slot_size)
{
	return rounddown_pow_of_two(SV_RING_FIT(pages, slot_size));
}

/* Attaches to zeroed, page-aligned ring memory of @pages pages. */
static inline void pvring_init(struct pvring_front *r, void *mem,
			       unsigned int pages, u32 slot_size)
{
	r->sring = mem;
	r->slots = (u8 *)mem + SV_RING_HEADER_SIZE;
	r->size = pvring_slots(pages, slot_size);
	r->slot_size = slot_size;
	r->req_prod_pvt = 0;
	r->req_prod = 0;
	r->rsp_cons = 0;
	/*
	 * The back end attaches only after reading the ring's grant from the
	 * store, which orders these stores before its first access.
	 */
	WRITE_ONCE(r->sring->req_prod, 0);
	WRITE_ONCE(r->sring->rsp_prod, 0);
	WRITE_ONCE(r->sring->req_event, 1);
	WRITE_ONCE(r->sring->rsp_event, 1);
}

static inline void *pvring_slot(const struct pvring_front *r, u32 idx)
{
	return r->slots + (size_t)(idx & (r->size - 1)) * r->slot_size;
}

/* Free slots for new requests. */
static inline u32 pvring_free(const struct pvring_front *r)
{
	return r->size - (r->req_prod_pvt - r->rsp_cons);
}

/* The slot for the next request (check pvring_free() first). */
static inline void *pvring_next_request(struct pvring_front *r)
{
	return pvring_slot(r, r->req_prod_pvt++);
}

/*
 * Publishes the requests written so far; true if the back end asked to be
 * notified of them (its req_event lies in the newly published range).
 */
static inline bool pvring_push_requests(struct pvring_front *r)
{
	u32 old = r->req_prod, new = r->req_prod_pvt;

	if (old == new)
		return false;
	/* The slots must be visible before the index that publishes them. */
	virt_wmb();
	WRITE_ONCE(r->sring->req_prod, new);
	r->req_prod = new;
	/* Publish req_prod before reading req_event (pairs with the back
	 * end's final check): one of us sees the other. */
	virt_mb();
	return (u32)(new - READ_ONCE(r->sring->req_event)) < (u32)(new - old);
}

/*
 * The back end's rsp_prod, checked: -EIO if it claims to answer requests
 * we never published (the ring is then broken for good).
 */
static inline int pvring_rsp_prod(const struct pvring_front *r, u32 *prod)
{
	u32 p = READ_ONCE(r->sring->rsp_prod);

	/* Read the responses only after the index that covers them. */
	virt_rmb();
	if ((u32)(p - r->rsp_cons) > (u32)(r->req_prod - r->rsp_cons))
		return -EIO;
	*prod = p;
	return 0;
}

/*
 * Going idle: ask to be notified at the next response, then look again;
 * true if responses arrived meanwhile (consume them and call again).
 */
static inline bool pvring_final_check(struct pvring_front *r)
{
	WRITE_ONCE(r->sring->rsp_event, r->rsp_cons + 1);
	/* rsp_event must be visible before rsp_prod is read again. */
	virt_mb();
	return READ_ONCE(r->sring->rsp_prod) != r->rsp_cons;
}

#endif /* SPLITVISOR_PVRING_H */
