// SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause
/*
 * Hypercalls through the port-I/O transport: each vCPU has a hypercall page
 * (start-info names the first; vCPU i's is i pages further).  The caller
 * fills the request block at its start and executes `out 0xe8, al`; when the
 * instruction retires, the hypervisor has written the result.  The rest of
 * the page is guest scratch space, where argument structs go, so no caller
 * ever needs the guest-physical address of its own (possibly vmalloc'ed)
 * stack.
 *
 * Linux numbers CPUs its own way; CPUID leaf base+3 tells each CPU which
 * vCPU it is, read once when the CPU comes online.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cpuhotplug.h>
#include <linux/io.h>
#include <linux/irqflags.h>
#include <linux/percpu.h>
#include <linux/string.h>
#include <asm/processor.h>

#include "pvbus.h"

static void *pvbus_hcall_pages;
static DEFINE_PER_CPU(int, pvbus_vcpu) = -1;
static enum cpuhp_state pvbus_cpuhp_state;

static int pvbus_cpu_online(unsigned int cpu)
{
	u32 vcpu, nr, ecx, edx;

	/* AP_ONLINE_DYN callbacks run on the CPU coming online. */
	cpuid(pvbus_plat.cpuid_base + SV_CPUID_LEAF_VCPU, &vcpu, &nr, &ecx,
	      &edx);
	if (vcpu >= pvbus_plat.nr_vcpus) {
		pr_warn("CPU %u reports vCPU %u of %u; no hypercalls on it\n",
			cpu, vcpu, pvbus_plat.nr_vcpus);
		per_cpu(pvbus_vcpu, cpu) = -1;
		return 0;
	}
	per_cpu(pvbus_vcpu, cpu) = vcpu;
	return 0;
}

static int pvbus_cpu_offline(unsigned int cpu)
{
	per_cpu(pvbus_vcpu, cpu) = -1;
	return 0;
}

long pvbus_hypercall(u64 nr, u64 cmd, void *arg, size_t len)
{
	struct sv_hypercall_request *req;
	unsigned long flags;
	void *scratch;
	long ret;
	int vcpu;

	if (len > SV_PAGE_SIZE - SV_HYPERCALL_SCRATCH_OFFSET)
		return -E2BIG;

	/*
	 * The page belongs to this vCPU: with interrupts off nothing else on
	 * this CPU (an interrupt handler notifying a port, say) can reuse it
	 * before we have read the result, and we cannot migrate.
	 */
	local_irq_save(flags);
	vcpu = this_cpu_read(pvbus_vcpu);
	if (vcpu < 0) {
		ret = -ENODEV;
		goto out;
	}
	req = pvbus_hcall_pages + (size_t)vcpu * SV_PAGE_SIZE;
	scratch = (u8 *)req + SV_HYPERCALL_SCRATCH_OFFSET;
	if (len)
		memcpy(scratch, arg, len);
	memset(req, 0, sizeof(*req));
	req->nr = nr;
	req->args[0] = cmd;
	req->args[1] = pvbus_plat.hypercall_pages_gpa +
		       (u64)vcpu * SV_PAGE_SIZE + SV_HYPERCALL_SCRATCH_OFFSET;
	req->args[2] = 1;	/* the count of GRANT_TABLE_OP; ignored by others */
	/*
	 * outb() has no memory clobber: keep the compiler from sinking the
	 * stores above past it or hoisting the loads below before it.  The
	 * exit itself orders the CPU: the hypervisor reads the page after
	 * every earlier store has retired.
	 */
	barrier();
	outb(0, SV_HYPERCALL_PORT);
	barrier();
	ret = READ_ONCE(req->result);
	if (len)
		memcpy(arg, scratch, len);
out:
	local_irq_restore(flags);
	return ret;
}
EXPORT_SYMBOL_GPL(pvbus_hypercall);

int pvbus_hypercall_init(void)
{
	int ret;

	pvbus_hcall_pages = memremap(pvbus_plat.hypercall_pages_gpa,
				     (size_t)pvbus_plat.nr_vcpus * SV_PAGE_SIZE,
				     MEMREMAP_WB);
	if (!pvbus_hcall_pages) {
		pr_err("cannot map the hypercall pages at %#llx\n",
		       pvbus_plat.hypercall_pages_gpa);
		return -ENOMEM;
	}
	ret = cpuhp_setup_state(CPUHP_AP_ONLINE_DYN, "splitvisor/pvbus:online",
				pvbus_cpu_online, pvbus_cpu_offline);
	if (ret < 0) {
		memunmap(pvbus_hcall_pages);
		return ret;
	}
	pvbus_cpuhp_state = ret;
	return 0;
}

void pvbus_hypercall_exit(void)
{
	cpuhp_remove_state(pvbus_cpuhp_state);
	memunmap(pvbus_hcall_pages);
}
