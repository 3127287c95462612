// SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause
/*
 * Event channels (2-level): the hypervisor sets a port's bit in the
 * shared-info pending bitmap and, if the port is unmasked, the word's bit
 * in vCPU 0's selector and vCPU 0's upcall_pending.  The upcall handler
 * clears those and calls the handler of every pending, unmasked port
 * (Xen's evtchn_do_upcall).
 *
 * What runs the upcall handler depends on the platform (CPUID leaf base+1):
 *  - SV_PLATFORM_F_UPCALL_GSI: an ISA interrupt line, registered with
 *    HVM_OP(SET_PARAM, CALLBACK_IRQ) and taken with request_irq();
 *  - otherwise a polling hrtimer (every poll_us microseconds, hard-irq
 *    context), because the hypervisor has no interrupt injection yet and
 *    answers HVM_OP with -ENOSYS.  Handlers see the same context either way.
 *
 * Either way one context runs the scan at a time (one interrupt line, or
 * one timer), so each port's handler is never re-entered.  Handlers are
 * looked up under RCU; unbinding masks the port, unpublishes the handler
 * and waits for a grace period, after which it cannot be running.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bitops.h>
#include <linux/hrtimer.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/rcupdate.h>
#include <linux/slab.h>
#include <asm/sync_bitops.h>

#include "pvbus.h"

static unsigned int poll_us = 1000;
module_param(poll_us, uint, 0444);
MODULE_PARM_DESC(poll_us,
		 "Event polling period in microseconds when the platform offers no upcall interrupt (default 1000)");

struct pvbus_evtchn {
	pvbus_evtchn_handler_t handler;
	void *data;
	const char *name;
};

static struct sv_shared_info *pvbus_shared;
/* Handler of each port, indexed by port; writers hold pvbus_ports_mutex. */
static struct pvbus_evtchn __rcu **pvbus_ports;
static DEFINE_MUTEX(pvbus_ports_mutex);

static struct hrtimer pvbus_poll_timer;
static int pvbus_upcall_irq = -1;

static unsigned long *pvbus_pending_bitmap(void)
{
	return (unsigned long *)pvbus_shared->evtchn_pending;
}

static unsigned long *pvbus_mask_bitmap(void)
{
	return (unsigned long *)pvbus_shared->evtchn_mask;
}

static void pvbus_evtchn_handle(unsigned int port)
{
	struct pvbus_evtchn *e;

	rcu_read_lock();
	e = rcu_dereference(pvbus_ports[port]);
	/* NULL: the port was unbound while its event was on the way. */
	if (e)
		e->handler(port, e->data);
	rcu_read_unlock();
}

/* The upcall: handle every pending, unmasked port.  Hard-irq context. */
static void pvbus_evtchn_do_upcall(void)
{
	struct sv_vcpu_info *vi = &pvbus_shared->vcpu_info[0];
	unsigned long sel, pending;
	unsigned int word, bit, port;

	while (READ_ONCE(vi->upcall_pending)) {
		WRITE_ONCE(vi->upcall_pending, 0);
		/*
		 * xchg is a full barrier: the flag is cleared before the
		 * selector is taken, so an event raised after this point sets
		 * the flag again and we go round once more.
		 */
		sel = xchg(&vi->pending_sel, 0);
		while (sel) {
			word = __ffs(sel);
			sel &= sel - 1;
			pending = READ_ONCE(pvbus_shared->evtchn_pending[word]) &
				  ~READ_ONCE(pvbus_shared->evtchn_mask[word]);
			while (pending) {
				bit = __ffs(pending);
				pending &= pending - 1;
				port = word * SV_EVTCHN_BITS_PER_WORD + bit;
				if (port >= pvbus_plat.max_ports)
					break;
				/* Locked: the hypervisor sets bits concurrently. */
				if (sync_test_and_clear_bit(port,
							    pvbus_pending_bitmap()))
					pvbus_evtchn_handle(port);
			}
		}
	}
}

static irqreturn_t pvbus_upcall_interrupt(int irq, void *dev_id)
{
	pvbus_evtchn_do_upcall();
	return IRQ_HANDLED;
}

static enum hrtimer_restart pvbus_poll(struct hrtimer *timer)
{
	pvbus_evtchn_do_upcall();
	hrtimer_forward_now(timer, ns_to_ktime((u64)poll_us * NSEC_PER_USEC));
	return HRTIMER_RESTART;
}

static long pvbus_set_callback(u64 via)
{
	struct sv_hvm_param p = {
		.domid = SV_DOMID_SELF,
		.index = SV_HVM_PARAM_CALLBACK_IRQ,
		.value = via,
	};

	return pvbus_hypercall(SV_HVM_OP, SV_HVMOP_SET_PARAM, &p, sizeof(p));
}

/* Asks for upcalls as an ISA interrupt; false if the platform cannot. */
static bool pvbus_upcall_irq_setup(void)
{
	unsigned int gsi = pvbus_plat.upcall_gsi;
	long rc;
	int ret;

	if (!(pvbus_plat.features & SV_PLATFORM_F_UPCALL_GSI))
		return false;
	/* Only ISA lines have a fixed Linux IRQ number; 0 and 2 are taken. */
	if (gsi == 0 || gsi == 2 || gsi >= 16) {
		pr_warn("upcall GSI %u is not a usable ISA line\n", gsi);
		return false;
	}
	/* The handler goes in first: the first upcall may follow at once. */
	ret = request_irq(gsi, pvbus_upcall_interrupt, 0, "pvbus-upcall",
			  &pvbus_plat);
	if (ret) {
		pr_warn("cannot take IRQ %u for upcalls: %d\n", gsi, ret);
		return false;
	}
	rc = pvbus_set_callback((u64)SV_CALLBACK_VIA_TYPE_GSI
				<< SV_CALLBACK_VIA_TYPE_SHIFT | gsi);
	if (rc < 0) {
		pr_warn("HVM_OP(CALLBACK_IRQ, GSI %u): %ld\n", gsi, rc);
		free_irq(gsi, &pvbus_plat);
		return false;
	}
	pvbus_upcall_irq = gsi;
	return true;
}

int pvbus_evtchn_alloc_unbound(pvbus_domid_t remote, unsigned int *port)
{
	struct sv_evtchn_alloc_unbound a = {
		.dom = SV_DOMID_SELF,
		.remote_dom = remote,
	};
	long rc;

	rc = pvbus_hypercall(SV_HYPERVISOR_event_channel_op,
			     SV_EVTCHNOP_alloc_unbound, &a, sizeof(a));
	if (rc < 0)
		return rc;
	if (a.port >= pvbus_plat.max_ports) {
		pr_err("alloc_unbound returned port %u of %u\n", a.port,
		       pvbus_plat.max_ports);
		return -EIO;
	}
	*port = a.port;
	return 0;
}
EXPORT_SYMBOL_GPL(pvbus_evtchn_alloc_unbound);

int pvbus_evtchn_close(unsigned int port)
{
	struct sv_evtchn_port a = { .port = port };
	long rc;

	rc = pvbus_hypercall(SV_HYPERVISOR_event_channel_op,
			     SV_EVTCHNOP_close, &a, sizeof(a));
	return rc < 0 ? rc : 0;
}
EXPORT_SYMBOL_GPL(pvbus_evtchn_close);

int pvbus_evtchn_bind(unsigned int port, pvbus_evtchn_handler_t handler,
		      void *data, const char *name)
{
	struct sv_evtchn_port a = { .port = port };
	struct pvbus_evtchn *e;
	long rc;

	if (port >= pvbus_plat.max_ports)
		return -EINVAL;
	e = kzalloc(sizeof(*e), GFP_KERNEL);
	if (!e)
		return -ENOMEM;
	e->handler = handler;
	e->data = data;
	e->name = name;

	mutex_lock(&pvbus_ports_mutex);
	if (rcu_access_pointer(pvbus_ports[port])) {
		mutex_unlock(&pvbus_ports_mutex);
		kfree(e);
		return -EBUSY;
	}
	rcu_assign_pointer(pvbus_ports[port], e);
	mutex_unlock(&pvbus_ports_mutex);

	/* The hypervisor clears the mask and re-raises a pending event. */
	rc = pvbus_hypercall(SV_HYPERVISOR_event_channel_op,
			     SV_EVTCHNOP_unmask, &a, sizeof(a));
	if (rc < 0) {
		pvbus_evtchn_unbind(port);
		return rc;
	}
	return 0;
}
EXPORT_SYMBOL_GPL(pvbus_evtchn_bind);

void pvbus_evtchn_unbind(unsigned int port)
{
	struct pvbus_evtchn *e;

	if (WARN_ON_ONCE(port >= pvbus_plat.max_ports))
		return;
	sync_set_bit(port, pvbus_mask_bitmap());
	mutex_lock(&pvbus_ports_mutex);
	e = rcu_dereference_protected(pvbus_ports[port],
				      lockdep_is_held(&pvbus_ports_mutex));
	RCU_INIT_POINTER(pvbus_ports[port], NULL);
	mutex_unlock(&pvbus_ports_mutex);
	if (!e)
		return;
	/* The upcall reads handlers under RCU: after this none is running. */
	synchronize_rcu();
	sync_clear_bit(port, pvbus_pending_bitmap());
	kfree(e);
}
EXPORT_SYMBOL_GPL(pvbus_evtchn_unbind);

void pvbus_evtchn_notify(unsigned int port)
{
	if (WARN_ON_ONCE(port >= pvbus_plat.max_ports))
		return;
	/*
	 * The doorbell: port p is `out DOORBELL_BASE + p / 256, p % 256`.
	 * Callers publish their ring indices with a full barrier first; an
	 * I/O write is not reordered before earlier stores on x86.
	 */
	outb(port % 256, SV_DOORBELL_BASE + port / 256);
}
EXPORT_SYMBOL_GPL(pvbus_evtchn_notify);

int pvbus_evtchn_init(void)
{
	unsigned int w;

	if (!poll_us)
		poll_us = 1;
	pvbus_shared = memremap(pvbus_plat.shared_info_gpa, SV_PAGE_SIZE,
				MEMREMAP_WB);
	if (!pvbus_shared) {
		pr_err("cannot map shared info at %#llx\n",
		       pvbus_plat.shared_info_gpa);
		return -ENOMEM;
	}
	pvbus_ports = kcalloc(pvbus_plat.max_ports, sizeof(*pvbus_ports),
			      GFP_KERNEL);
	if (!pvbus_ports) {
		memunmap(pvbus_shared);
		return -ENOMEM;
	}
	/* Nothing is ours until bound: mask every port. */
	for (w = 0; w < ARRAY_SIZE(pvbus_shared->evtchn_mask); w++)
		WRITE_ONCE(pvbus_shared->evtchn_mask[w], ~0ULL);

	if (pvbus_upcall_irq_setup()) {
		pr_info("event upcalls on IRQ %d\n", pvbus_upcall_irq);
	} else {
		hrtimer_init(&pvbus_poll_timer, CLOCK_MONOTONIC,
			     HRTIMER_MODE_REL_HARD);
		pvbus_poll_timer.function = pvbus_poll;
		hrtimer_start(&pvbus_poll_timer,
			      ns_to_ktime((u64)poll_us * NSEC_PER_USEC),
			      HRTIMER_MODE_REL_HARD);
		pr_info("no upcall interrupt offered: polling events every %u us\n",
			poll_us);
	}
	return 0;
}

void pvbus_evtchn_exit(void)
{
	unsigned int port;

	if (pvbus_upcall_irq >= 0) {
		pvbus_set_callback(0);
		free_irq(pvbus_upcall_irq, &pvbus_plat);
		pvbus_upcall_irq = -1;
	} else {
		hrtimer_cancel(&pvbus_poll_timer);
	}
	for (port = 0; port < pvbus_plat.max_ports; port++)
		WARN(rcu_access_pointer(pvbus_ports[port]),
		     "event port %u still bound at unload\n", port);
	kfree(pvbus_ports);
	memunmap(pvbus_shared);
}
