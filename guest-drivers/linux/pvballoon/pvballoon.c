// SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause
/*
 * pvballoon: the memory balloon for Splitvisor guests, after Linux's
 * xen-balloon (drivers/xen/balloon.c and xen-balloon.c).
 *
 * The toolstack writes the domain's target into <home>/memory/target (KiB;
 * `xl mem-set`).  A watch on it queues the balloon work, which moves the
 * domain towards the target in batches of at most SV_MEMORY_MAX_EXTENTS
 * pages:
 *  - down: allocate pages from the page allocator (they stay allocated, so
 *    nothing else in the kernel uses them), give their frames back with
 *    memory_op(XENMEM_decrease_reservation), keep them on the ballooned
 *    list;
 *  - up: take pages off the ballooned list, populate their frames again with
 *    memory_op(XENMEM_populate_physmap) (they come back zeroed), and free
 *    them to the page allocator.
 * It reports what the domain holds in <home>/memory/current (KiB), where the
 * Rust guest reports it too.  A batch the host (or the allocator) cuts short
 * is retried after a delay that doubles up to 32 s, as xen-balloon does.
 *
 * Frames are named by guest frame number (page_to_pfn: guest-physical
 * address >> PAGE_SHIFT on this platform).  The frame list lives in a page of
 * its own, whose guest-physical address goes into the reservation; the
 * reservation itself is copied into the hypercall page by pvbus.
 *
 * Not done (xen-balloon does it with memory hotplug): growing beyond the
 * memory the kernel booted with; a target above it is met up to it.  On
 * unload every ballooned page is populated before it is freed; a page whose
 * frame the host will not give back is leaked, never freed into use.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/err.h>
#include <linux/gfp.h>
#include <linux/kernel.h>
#include <linux/list.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/workqueue.h>
#include <asm/io.h>
#include <splitvisor/pvbus.h>

#define PVBALLOON_BATCH		SV_MEMORY_MAX_EXTENTS
#define PVBALLOON_MAX_DELAY	32	/* seconds */
/* KiB per page. */
#define PAGE_KIB		(PAGE_SIZE / 1024)

static DEFINE_MUTEX(pvballoon_mutex);
/* Under pvballoon_mutex. */
static LIST_HEAD(pvballoon_pages);	/* given back, linked through page->lru */
static unsigned long pvballoon_held;	/* pages the domain holds */
static unsigned long pvballoon_ballooned;	/* pages on the list */
static unsigned long pvballoon_target;	/* pages */
static unsigned int pvballoon_delay = 1;
static u64 *pvballoon_frames;		/* one page: the frame list */
static struct page *pvballoon_batch[PVBALLOON_BATCH];	/* pages being given back */

static char pvballoon_dir[64];		/* "/local/domain/<id>/memory" */
static char pvballoon_target_path[80];

static void pvballoon_process(struct work_struct *work);
static DECLARE_DELAYED_WORK(pvballoon_work, pvballoon_process);

/* memory_op(@cmd) on @n frames of pvballoon_frames: frames done, or -errno. */
static long pvballoon_reservation(u64 cmd, unsigned int n)
{
	struct sv_memory_reservation res = {
		.extent_start = virt_to_phys(pvballoon_frames),
		.nr_extents = n,
		.extent_order = 0,
		.mem_flags = 0,
		.domid = SV_DOMID_SELF,
	};

	return pvbus_hypercall(SV_HYPERVISOR_memory_op, cmd, &res,
			       sizeof(res));
}

static long pvballoon_current_reservation(void)
{
	u16 domid = SV_DOMID_SELF;

	return pvbus_hypercall(SV_HYPERVISOR_memory_op,
			       SV_XENMEM_current_reservation, &domid,
			       sizeof(domid));
}

static void pvballoon_report(void)
{
	int err = pvbus_xs_printf(PVBUS_XS_NO_TX, pvballoon_dir, "current",
				  "%lu", pvballoon_held * PAGE_KIB);

	if (err)
		pr_warn_ratelimited("cannot write memory/current: %d\n", err);
}

/*
 * Gives up to @want pages back; returns how many went, or -errno when the
 * first batch was refused outright.
 */
static long pvballoon_decrease(unsigned long want)
{
	struct page **pages = pvballoon_batch;
	unsigned int n, i;
	long done;

	want = min_t(unsigned long, want, PVBALLOON_BATCH);
	for (n = 0; n < want; n++) {
		pages[n] = alloc_page(GFP_HIGHUSER | __GFP_NOWARN |
				      __GFP_NORETRY | __GFP_NOMEMALLOC);
		if (!pages[n])
			break;
		pvballoon_frames[n] = page_to_pfn(pages[n]);
	}
	if (n == 0)
		return -ENOMEM;
	done = pvballoon_reservation(SV_XENMEM_decrease_reservation, n);
	for (i = 0; i < n; i++) {
		if (done > 0 && i < done) {
			list_add(&pages[i]->lru, &pvballoon_pages);
			pvballoon_ballooned++;
			pvballoon_held--;
		} else {
			/* The host kept it: still ours to use. */
			__free_page(pages[i]);
		}
	}
	return done;
}

/*
 * Takes up to @want ballooned pages back; returns how many came, or -errno
 * when the first batch was refused outright.
 */
static long pvballoon_increase(unsigned long want)
{
	struct page *page, *next;
	unsigned int n = 0;
	long done;
	unsigned int i;

	want = min_t(unsigned long, want, PVBALLOON_BATCH);
	list_for_each_entry(page, &pvballoon_pages, lru) {
		if (n == want)
			break;
		pvballoon_frames[n++] = page_to_pfn(page);
	}
	if (n == 0)
		return 0;
	done = pvballoon_reservation(SV_XENMEM_populate_physmap, n);
	if (done <= 0)
		return done;
	/* The first @done frames listed hold memory again: free their pages. */
	i = 0;
	list_for_each_entry_safe(page, next, &pvballoon_pages, lru) {
		if (i == done)
			break;
		list_del(&page->lru);
		__free_page(page);
		pvballoon_ballooned--;
		pvballoon_held++;
		i++;
	}
	return done;
}

static void pvballoon_process(struct work_struct *work)
{
	bool retry = false;
	long got = 0;

	mutex_lock(&pvballoon_mutex);
	if (pvballoon_held > pvballoon_target) {
		got = pvballoon_decrease(pvballoon_held - pvballoon_target);
		retry = got < 0 || pvballoon_held > pvballoon_target;
	} else if (pvballoon_held < pvballoon_target && pvballoon_ballooned) {
		got = pvballoon_increase(pvballoon_target - pvballoon_held);
		retry = got < 0 ||
			(pvballoon_held < pvballoon_target && pvballoon_ballooned);
	}
	pvballoon_report();
	if (got < 0) {
		/* Refused (or no page to give): back off, as xen-balloon does. */
		pr_info_ratelimited("holding %lu KiB, target %lu KiB: %ld; retry in %u s\n",
				    pvballoon_held * PAGE_KIB,
				    pvballoon_target * PAGE_KIB, got,
				    pvballoon_delay);
		schedule_delayed_work(&pvballoon_work, pvballoon_delay * HZ);
		pvballoon_delay = min(pvballoon_delay * 2, PVBALLOON_MAX_DELAY);
	} else if (retry) {
		pvballoon_delay = 1;
		schedule_delayed_work(&pvballoon_work, 0);
	} else {
		pvballoon_delay = 1;
	}
	mutex_unlock(&pvballoon_mutex);
}

static void pvballoon_target_changed(struct pvbus_watch *watch,
				     const char *path)
{
	unsigned int kib;

	if (pvbus_xs_read_uint(PVBUS_XS_NO_TX, pvballoon_dir, "target", &kib))
		return;	/* absent: no request */
	mutex_lock(&pvballoon_mutex);
	pvballoon_target = kib / PAGE_KIB;
	pvballoon_delay = 1;
	mutex_unlock(&pvballoon_mutex);
	mod_delayed_work(system_wq, &pvballoon_work, 0);
}

static struct pvbus_watch pvballoon_watch = {
	.path = pvballoon_target_path,
	.callback = pvballoon_target_changed,
};

static int __init pvballoon_init(void)
{
	long held;
	int err;

	held = pvballoon_current_reservation();
	if (held < 0) {
		pr_info("no memory_op: %ld\n", held);
		return held == -ENOSYS ? -ENODEV : (int)held;
	}
	pvballoon_frames = (u64 *)get_zeroed_page(GFP_KERNEL);
	if (!pvballoon_frames)
		return -ENOMEM;
	pvballoon_held = held;
	pvballoon_target = held;
	snprintf(pvballoon_dir, sizeof(pvballoon_dir), "/local/domain/%u/memory",
		 pvbus_self_domid());
	snprintf(pvballoon_target_path, sizeof(pvballoon_target_path), "%s/%s",
		 pvballoon_dir, "target");
	err = pvbus_watch_register(&pvballoon_watch);
	if (err) {
		free_page((unsigned long)pvballoon_frames);
		return err;
	}
	pr_info("holding %lu KiB\n", pvballoon_held * PAGE_KIB);
	return 0;
}

static void __exit pvballoon_exit(void)
{
	struct page *page, *next;
	long done;

	pvbus_watch_unregister(&pvballoon_watch);
	cancel_delayed_work_sync(&pvballoon_work);
	mutex_lock(&pvballoon_mutex);
	/* Every page goes back to the allocator only with memory behind it. */
	while (pvballoon_ballooned) {
		done = pvballoon_increase(pvballoon_ballooned);
		if (done <= 0)
			break;
	}
	list_for_each_entry_safe(page, next, &pvballoon_pages, lru) {
		/* Never freed into use without its frame: leaked instead. */
		list_del(&page->lru);
	}
	if (pvballoon_ballooned)
		pr_warn("leaking %lu pages the host did not give back\n",
			pvballoon_ballooned);
	pvballoon_report();
	mutex_unlock(&pvballoon_mutex);
	free_page((unsigned long)pvballoon_frames);
}

module_init(pvballoon_init);
module_exit(pvballoon_exit);

MODULE_DESCRIPTION("Splitvisor memory balloon (memory/target, memory_op)");
MODULE_AUTHOR("The Splitvisor authors");
MODULE_LICENSE("Dual BSD/GPL");
