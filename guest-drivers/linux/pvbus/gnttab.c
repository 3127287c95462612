// SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause
/*
 * Grant table (v1): our table of entries that let another domain map or
 * copy one page of ours.  GNTTABOP_query_size says how many frames the
 * table has; GNTTABOP_setup_table says where they are.
 *
 * An entry is made valid by writing frame and domid first, then the flags;
 * it is revoked with a compare-exchange of the flags to 0 that fails while
 * the hypervisor has set GTF_reading or GTF_writing for a live mapping.  A
 * reference whose page is still mapped is never reused and its page never
 * freed: pvbus_gnttab_end_access_free() parks both until the grantee lets
 * go.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/io.h>
#include <linux/list.h>
#include <linux/mm.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/workqueue.h>
#include <asm/barrier.h>

#include "pvbus.h"

/* Like Xen, the first entries are left to the toolstack. */
#define PVBUS_GNTTAB_RESERVED	8
/* How often parked references are retried, and how often we complain. */
#define PVBUS_GNTTAB_RETRY	HZ
#define PVBUS_GNTTAB_WARN_EVERY	60

static struct sv_grant_entry_v1 *gnttab_frames[SV_MAX_GRANT_FRAMES];
static unsigned int gnttab_nr_frames;
static unsigned int gnttab_nr_refs;

/* The free references, a stack; gnttab_lock protects both. */
static DEFINE_SPINLOCK(gnttab_lock);
static pvbus_gref_t *gnttab_free;
static unsigned int gnttab_nr_free;

struct pvbus_gnttab_parked {
	struct list_head list;
	pvbus_gref_t ref;
	struct page *page;
	unsigned int tries;
};

static DEFINE_SPINLOCK(gnttab_parked_lock);
static LIST_HEAD(gnttab_parked);
static void pvbus_gnttab_retry(struct work_struct *work);
static DECLARE_DELAYED_WORK(gnttab_retry_work, pvbus_gnttab_retry);

static struct sv_grant_entry_v1 *pvbus_gnttab_entry(pvbus_gref_t ref)
{
	return &gnttab_frames[ref / SV_GNTTAB_ENTRIES_PER_PAGE]
			     [ref % SV_GNTTAB_ENTRIES_PER_PAGE];
}

int pvbus_gnttab_alloc_refs(unsigned int count, pvbus_gref_t *refs)
{
	unsigned long flags;
	unsigned int i;

	spin_lock_irqsave(&gnttab_lock, flags);
	if (count > gnttab_nr_free) {
		spin_unlock_irqrestore(&gnttab_lock, flags);
		return -ENOSPC;
	}
	for (i = 0; i < count; i++)
		refs[i] = gnttab_free[--gnttab_nr_free];
	spin_unlock_irqrestore(&gnttab_lock, flags);
	return 0;
}
EXPORT_SYMBOL_GPL(pvbus_gnttab_alloc_refs);

void pvbus_gnttab_free_refs(const pvbus_gref_t *refs, unsigned int count)
{
	unsigned long flags;
	unsigned int i;

	spin_lock_irqsave(&gnttab_lock, flags);
	for (i = 0; i < count; i++) {
		if (WARN_ON_ONCE(refs[i] < PVBUS_GNTTAB_RESERVED ||
				 refs[i] >= gnttab_nr_refs ||
				 gnttab_nr_free >= gnttab_nr_refs))
			continue;
		/* Freeing a live grant would hand the page to the next user. */
		WARN_ON_ONCE(READ_ONCE(pvbus_gnttab_entry(refs[i])->flags));
		gnttab_free[gnttab_nr_free++] = refs[i];
	}
	spin_unlock_irqrestore(&gnttab_lock, flags);
}
EXPORT_SYMBOL_GPL(pvbus_gnttab_free_refs);

void pvbus_gnttab_grant(pvbus_gref_t ref, pvbus_domid_t domid,
			unsigned long gfn, bool readonly)
{
	u16 flags = SV_GTF_permit_access | (readonly ? SV_GTF_readonly : 0);
	struct sv_grant_entry_v1 *e;

	/* Frames are 32 bits in v1 entries: 16 TiB of guest memory. */
	if (WARN_ON_ONCE(gfn > U32_MAX || ref >= gnttab_nr_refs))
		return;
	e = pvbus_gnttab_entry(ref);
	WRITE_ONCE(e->frame, gfn);
	WRITE_ONCE(e->domid, domid);
	/* The hypervisor must see frame and domid before the entry is valid. */
	virt_wmb();
	WRITE_ONCE(e->flags, flags);
}
EXPORT_SYMBOL_GPL(pvbus_gnttab_grant);

bool pvbus_gnttab_end_access(pvbus_gref_t ref)
{
	struct sv_grant_entry_v1 *e;
	u16 flags, prev;

	if (WARN_ON_ONCE(ref >= gnttab_nr_refs))
		return false;
	e = pvbus_gnttab_entry(ref);
	flags = READ_ONCE(e->flags);
	for (;;) {
		if (flags & (SV_GTF_reading | SV_GTF_writing))
			return false;
		/*
		 * Full barrier (cmpxchg): pairs with the hypervisor's exchange
		 * that sets reading/writing when it maps the entry; one of the
		 * two exchanges fails.
		 */
		prev = cmpxchg(&e->flags, flags, 0);
		if (prev == flags)
			return true;
		flags = prev;
	}
}
EXPORT_SYMBOL_GPL(pvbus_gnttab_end_access);

static void pvbus_gnttab_release(pvbus_gref_t ref, struct page *page)
{
	pvbus_gnttab_free_refs(&ref, 1);
	if (page)
		__free_page(page);
}

void pvbus_gnttab_end_access_free(pvbus_gref_t ref, struct page *page)
{
	struct pvbus_gnttab_parked *p;
	unsigned long flags;

	if (pvbus_gnttab_end_access(ref)) {
		pvbus_gnttab_release(ref, page);
		return;
	}
	p = kmalloc(sizeof(*p), GFP_ATOMIC);
	if (!p) {
		/* Leaking is the only safe choice: the grantee still maps it. */
		pr_warn("grant %u still in use, no memory to park it: leaking it\n",
			ref);
		return;
	}
	p->ref = ref;
	p->page = page;
	p->tries = 0;
	spin_lock_irqsave(&gnttab_parked_lock, flags);
	list_add_tail(&p->list, &gnttab_parked);
	spin_unlock_irqrestore(&gnttab_parked_lock, flags);
	schedule_delayed_work(&gnttab_retry_work, PVBUS_GNTTAB_RETRY);
}
EXPORT_SYMBOL_GPL(pvbus_gnttab_end_access_free);

/* Retries every parked reference once; returns how many are still parked. */
static unsigned int pvbus_gnttab_retry_parked(void)
{
	struct pvbus_gnttab_parked *p, *n;
	unsigned int left = 0;
	unsigned long flags;
	LIST_HEAD(todo);

	spin_lock_irqsave(&gnttab_parked_lock, flags);
	list_splice_init(&gnttab_parked, &todo);
	spin_unlock_irqrestore(&gnttab_parked_lock, flags);

	list_for_each_entry_safe(p, n, &todo, list) {
		if (pvbus_gnttab_end_access(p->ref)) {
			list_del(&p->list);
			pvbus_gnttab_release(p->ref, p->page);
			kfree(p);
			continue;
		}
		if (++p->tries % PVBUS_GNTTAB_WARN_EVERY == 0)
			pr_warn("grant %u still mapped by domain %u after %u tries\n",
				p->ref, READ_ONCE(pvbus_gnttab_entry(p->ref)->domid),
				p->tries);
		left++;
	}

	spin_lock_irqsave(&gnttab_parked_lock, flags);
	list_splice(&todo, &gnttab_parked);
	spin_unlock_irqrestore(&gnttab_parked_lock, flags);
	return left;
}

static void pvbus_gnttab_retry(struct work_struct *work)
{
	if (pvbus_gnttab_retry_parked())
		schedule_delayed_work(&gnttab_retry_work, PVBUS_GNTTAB_RETRY);
}

static void pvbus_gnttab_unmap(void)
{
	unsigned int i;

	for (i = 0; i < gnttab_nr_frames; i++)
		memunmap(gnttab_frames[i]);
	gnttab_nr_frames = 0;
}

int pvbus_gnttab_init(void)
{
	struct sv_gnttab_query_size query = { .dom = SV_DOMID_SELF };
	struct sv_gnttab_setup_table setup = { .dom = SV_DOMID_SELF };
	unsigned int i, nr;
	u64 *frames;
	long rc;
	int ret;

	rc = pvbus_hypercall(SV_HYPERVISOR_grant_table_op,
			     SV_GNTTABOP_query_size, &query, sizeof(query));
	if (rc < 0 || query.status != SV_GNTST_okay) {
		pr_err("GNTTABOP_query_size: %ld, status %d\n", rc,
		       query.status);
		return rc < 0 ? rc : -EIO;
	}
	nr = query.max_nr_frames;
	if (!nr || nr > SV_MAX_GRANT_FRAMES) {
		pr_err("grant table of %u frames is out of range\n", nr);
		return -EIO;
	}

	/* The frame list must be addressable: kmalloc memory is linear. */
	frames = kcalloc(nr, sizeof(*frames), GFP_KERNEL);
	if (!frames)
		return -ENOMEM;
	setup.nr_frames = nr;
	setup.frame_list = virt_to_phys(frames);
	rc = pvbus_hypercall(SV_HYPERVISOR_grant_table_op,
			     SV_GNTTABOP_setup_table, &setup, sizeof(setup));
	if (rc < 0 || setup.status != SV_GNTST_okay) {
		pr_err("GNTTABOP_setup_table: %ld, status %d\n", rc,
		       setup.status);
		ret = rc < 0 ? rc : -EIO;
		goto out;
	}
	for (i = 0; i < nr; i++) {
		gnttab_frames[i] = memremap(frames[i] << SV_PAGE_SHIFT,
					    SV_PAGE_SIZE, MEMREMAP_WB);
		if (!gnttab_frames[i]) {
			pr_err("cannot map grant frame %#llx\n", frames[i]);
			ret = -ENOMEM;
			goto err_unmap;
		}
		gnttab_nr_frames++;
	}

	gnttab_nr_refs = nr * SV_GNTTAB_ENTRIES_PER_PAGE;
	gnttab_free = kvmalloc_array(gnttab_nr_refs, sizeof(*gnttab_free),
				     GFP_KERNEL);
	if (!gnttab_free) {
		ret = -ENOMEM;
		goto err_unmap;
	}
	/* Hand out low references first (the stack pops from the end). */
	for (i = gnttab_nr_refs; i-- > PVBUS_GNTTAB_RESERVED;)
		gnttab_free[gnttab_nr_free++] = i;
	pr_info("grant table: %u frames, %u references\n", nr,
		gnttab_nr_free);
	ret = 0;
	goto out;

err_unmap:
	pvbus_gnttab_unmap();
out:
	kfree(frames);
	return ret;
}

void pvbus_gnttab_exit(void)
{
	struct pvbus_gnttab_parked *p, *n;
	unsigned int left, in_use;

	cancel_delayed_work_sync(&gnttab_retry_work);
	left = pvbus_gnttab_retry_parked();
	if (left)
		pr_warn("%u grant(s) still mapped by back ends: leaking their pages\n",
			left);
	/* Nothing runs any more: the list is ours. */
	list_for_each_entry_safe(p, n, &gnttab_parked, list) {
		list_del(&p->list);
		kfree(p);
	}
	in_use = gnttab_nr_refs - PVBUS_GNTTAB_RESERVED - gnttab_nr_free;
	if (in_use != left)
		pr_warn("%u grant reference(s) not returned\n", in_use - left);
	pvbus_gnttab_unmap();
	kvfree(gnttab_free);
	gnttab_free = NULL;
	gnttab_nr_free = 0;
	gnttab_nr_refs = 0;
}
