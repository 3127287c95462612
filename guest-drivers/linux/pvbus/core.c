// SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause
/*
 * pvbus core: detect Splitvisor, read the start-info page, and bring the
 * platform services up (hypercalls, grant table, event channels, store,
 * bus) in order, tearing them down in reverse on unload or failure.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/io.h>
#include <linux/module.h>
#include <linux/string.h>
#include <asm/processor.h>

#include "pvbus.h"

#ifndef CONFIG_X86_64
#error "Splitvisor guests are x86-64"
#endif

struct pvbus_platform pvbus_plat;

pvbus_domid_t pvbus_self_domid(void)
{
	return pvbus_plat.domid;
}
EXPORT_SYMBOL_GPL(pvbus_self_domid);

/* Finds the Splitvisor CPUID block; 0 if this is not a Splitvisor domain. */
static u32 pvbus_find_cpuid_base(void)
{
	u32 base, eax, ebx, ecx, edx;

	for (base = SV_CPUID_SCAN_FIRST; base < SV_CPUID_SCAN_END;
	     base += SV_CPUID_SCAN_STEP) {
		cpuid(base, &eax, &ebx, &ecx, &edx);
		if (ebx == SV_CPUID_SIGNATURE_EBX &&
		    ecx == SV_CPUID_SIGNATURE_ECX &&
		    edx == SV_CPUID_SIGNATURE_EDX &&
		    eax >= base + SV_CPUID_LEAF_MAX)
			return base;
	}
	return 0;
}

static int pvbus_read_platform(void)
{
	u32 eax, ebx, ecx, edx, base;
	struct sv_start_info *si;
	int ret = 0;

	base = pvbus_find_cpuid_base();
	if (!base)
		return -ENODEV;
	pvbus_plat.cpuid_base = base;

	cpuid(base + SV_CPUID_LEAF_VERSION, &eax, &ebx, &ecx, &edx);
	if (eax >> 16 != SV_ABI_VERSION_MAJOR) {
		pr_err("hypervisor ABI %u.%u, this driver speaks %u.x\n",
		       eax >> 16, eax & 0xffff, SV_ABI_VERSION_MAJOR);
		return -ENODEV;
	}
	pvbus_plat.features = ebx;
	pvbus_plat.upcall_gsi = ecx;
	if (!(ebx & SV_PLATFORM_F_START_INFO) ||
	    !(ebx & SV_PLATFORM_F_VCPU_INDEX)) {
		pr_err("platform features %#x lack start-info or vCPU index\n",
		       ebx);
		return -ENODEV;
	}

	cpuid(base + SV_CPUID_LEAF_START_INFO, &eax, &ebx, &ecx, &edx);
	pvbus_plat.start_info_gpa = (u64)ebx << 32 | eax;
	if (ecx != SV_HYPERCALL_PORT || edx != SV_DOORBELL_BASE) {
		pr_err("unexpected I/O ports: hypercall %#x, doorbells %#x\n",
		       ecx, edx);
		return -ENODEV;
	}

	/*
	 * The page lies in memory the platform reserves (see abi.h); it is
	 * read once here and never again.
	 */
	si = memremap(pvbus_plat.start_info_gpa, SV_PAGE_SIZE, MEMREMAP_WB);
	if (!si) {
		pr_err("cannot map the start-info page at %#llx\n",
		       pvbus_plat.start_info_gpa);
		return -ENOMEM;
	}
	if (memcmp(si->magic, SV_START_INFO_MAGIC, SV_START_INFO_MAGIC_LEN) ||
	    si->abi_major != SV_ABI_VERSION_MAJOR) {
		pr_err("bad start-info page at %#llx\n",
		       pvbus_plat.start_info_gpa);
		ret = -ENODEV;
		goto out;
	}
	if (si->domid >= SV_DOMID_FIRST_RESERVED || !si->nr_vcpus ||
	    si->nr_vcpus > SV_MAX_VCPUS || !si->max_ports ||
	    si->max_ports > SV_EVTCHN_MAX_PORTS_2L ||
	    si->store_evtchn >= si->max_ports) {
		pr_err("start-info out of range: domain %u, %u vCPUs, %u ports, store port %u\n",
		       si->domid, si->nr_vcpus, si->max_ports, si->store_evtchn);
		ret = -ENODEV;
		goto out;
	}
	pvbus_plat.domid = si->domid;
	pvbus_plat.nr_vcpus = si->nr_vcpus;
	pvbus_plat.max_ports = si->max_ports;
	pvbus_plat.shared_info_gpa = si->shared_info;
	pvbus_plat.hypercall_pages_gpa = si->hypercall_pages;
	pvbus_plat.store_ring_gpa = si->store_ring;
	pvbus_plat.store_evtchn = si->store_evtchn;
out:
	memunmap(si);
	return ret;
}

static int __init pvbus_init(void)
{
	int ret;

	ret = pvbus_read_platform();
	if (ret)
		return ret;
	pr_info("Splitvisor domain %u, %u vCPU(s), CPUID base %#x, features %#x\n",
		pvbus_plat.domid, pvbus_plat.nr_vcpus, pvbus_plat.cpuid_base,
		pvbus_plat.features);

	ret = pvbus_hypercall_init();
	if (ret)
		return ret;
	ret = pvbus_gnttab_init();
	if (ret)
		goto err_gnttab;
	ret = pvbus_evtchn_init();
	if (ret)
		goto err_evtchn;
	ret = pvbus_xs_init();
	if (ret)
		goto err_xs;
	ret = pvbus_bus_init();
	if (ret)
		goto err_bus;
	return 0;

err_bus:
	pvbus_xs_exit();
err_xs:
	pvbus_evtchn_exit();
err_evtchn:
	pvbus_gnttab_exit();
err_gnttab:
	pvbus_hypercall_exit();
	return ret;
}

static void __exit pvbus_exit(void)
{
	pvbus_bus_exit();
	pvbus_xs_exit();
	pvbus_evtchn_exit();
	pvbus_gnttab_exit();
	pvbus_hypercall_exit();
}

module_init(pvbus_init);
module_exit(pvbus_exit);

MODULE_DESCRIPTION("Splitvisor platform bus: hypercalls, grant table, event channels, store");
MODULE_AUTHOR("The Splitvisor authors");
MODULE_LICENSE("Dual BSD/GPL");
