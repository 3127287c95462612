/* SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause */
/* pvbus internals shared by its source files. */
#ifndef PVBUS_INTERNAL_H
#define PVBUS_INTERNAL_H

#include <splitvisor/pvbus.h>

/* What pvbus learned at load time; written once, before anything uses it. */
struct pvbus_platform {
	u32 cpuid_base;
	u32 features;			/* SV_PLATFORM_F_* */
	u32 upcall_gsi;
	u64 start_info_gpa;
	u16 domid;
	u32 nr_vcpus;
	u32 max_ports;
	u64 shared_info_gpa;
	u64 hypercall_pages_gpa;
	u64 store_ring_gpa;
	u32 store_evtchn;
};

extern struct pvbus_platform pvbus_plat;

/* hypercall.c: per-CPU hypercall pages (vCPU index from CPUID). */
int pvbus_hypercall_init(void);
void pvbus_hypercall_exit(void);

/* gnttab.c */
int pvbus_gnttab_init(void);
void pvbus_gnttab_exit(void);

/* evtchn.c: the upcall (interrupt or polling timer) and the port table. */
int pvbus_evtchn_init(void);
void pvbus_evtchn_exit(void);

/* xs.c: the store connection and the watch thread. */
int pvbus_xs_init(void);
void pvbus_xs_exit(void);
/* "/local/domain/<id>", valid between pvbus_xs_init() and _exit(). */
extern const char *pvbus_home;

/* bus.c */
int pvbus_bus_init(void);
void pvbus_bus_exit(void);

#endif /* PVBUS_INTERNAL_H */
