/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The Splitvisor guest ABI for C guests (the Linux front-end modules).
 *
 * Hand-written C mirror of the Rust crate pv-protocol, which is the one
 * definition: every size, field offset and constant below is checked against
 * it by tests/tests/c_header.rs, which generates a C file of _Static_asserts
 * from the Rust values and compiles it against this header with gcc during
 * `cargo test --workspace`.  Change pv-protocol first, then this header.
 *
 * x86-64 only; every field is little-endian.  Compiles in the kernel and in
 * user space (it needs only <linux/types.h>).
 *
 * Sections follow pv-protocol's modules: platform, hypercall, start_info,
 * grant, evtchn, ring, blkif, netif, store; plus the XenbusState values the
 * device handshake writes into the store.
 */
#ifndef SPLITVISOR_ABI_H
#define SPLITVISOR_ABI_H

#include <linux/types.h>

#define SV_PAGE_SIZE		4096
#define SV_PAGE_SHIFT		12
#define SV_SECTOR_SIZE		512

/* ------------------------------------------------------------------ */
/* platform: detection through CPUID, upcalls                         */
/* ------------------------------------------------------------------ */

#define SV_CPUID_BASE			0x40000100u
#define SV_CPUID_LEAF_SIGNATURE		0
#define SV_CPUID_LEAF_VERSION		1
#define SV_CPUID_LEAF_START_INFO	2
#define SV_CPUID_LEAF_VCPU		3
#define SV_CPUID_LEAF_MAX		3
#define SV_CPUID_SCAN_FIRST		0x40000000u
#define SV_CPUID_SCAN_END		0x40010000u
#define SV_CPUID_SCAN_STEP		0x100u
/* "SplitvisorPV" in ebx, ecx, edx of the signature leaf. */
#define SV_CPUID_SIGNATURE_EBX		0x696c7053u	/* "Spli" */
#define SV_CPUID_SIGNATURE_ECX		0x73697674u	/* "tvis" */
#define SV_CPUID_SIGNATURE_EDX		0x5650726fu	/* "orPV" */

/* ebx of leaf base + 1 */
#define SV_PLATFORM_F_START_INFO	(1u << 0)
#define SV_PLATFORM_F_VCPU_INDEX	(1u << 1)
#define SV_PLATFORM_F_UPCALL_GSI	(1u << 2)
#define SV_PLATFORM_F_UPCALL_VECTOR	(1u << 3)

/* Bytes of each hypercall page the hypervisor never touches start here. */
#define SV_HYPERCALL_SCRATCH_OFFSET	128

#define SV_HVM_OP			34
#define SV_HVMOP_SET_PARAM		0
#define SV_HVMOP_GET_PARAM		1
#define SV_HVM_PARAM_CALLBACK_IRQ	0
#define SV_CALLBACK_VIA_TYPE_SHIFT	56
#define SV_CALLBACK_VIA_TYPE_GSI	0ull
#define SV_CALLBACK_VIA_TYPE_VECTOR	2ull

struct sv_hvm_param {
	__u16 domid;
	__u16 _pad;
	__u32 index;
	__u64 value;
};

/* ------------------------------------------------------------------ */
/* hypercall: transport, numbers, argument structs                    */
/* ------------------------------------------------------------------ */

#define SV_HYPERCALL_PORT		0xe8
#define SV_HYPERCALL_REQUEST_OFFSET	0
#define SV_ABI_VERSION_MAJOR		0
#define SV_ABI_VERSION_MINOR		2
#define SV_MAX_CONSOLE_IO		4096
#define SV_MAX_POLL_PORTS		128
#define SV_MAX_TIMER_NS			86400000000000ull	/* one day */

#define SV_HYPERVISOR_memory_op		12
#define SV_HYPERVISOR_xen_version	17
#define SV_HYPERVISOR_console_io	18
#define SV_HYPERVISOR_grant_table_op	20
#define SV_HYPERVISOR_vcpu_op		24
#define SV_HYPERVISOR_sched_op		29
#define SV_HYPERVISOR_event_channel_op	32

#define SV_XENVER_version		0
#define SV_XENVER_get_features		6
#define SV_CONSOLEIO_write		0
#define SV_CONSOLEIO_read		1
#define SV_GNTTABOP_setup_table		2
#define SV_GNTTABOP_query_size		6
#define SV_SCHEDOP_yield		0
#define SV_SCHEDOP_block		1
#define SV_SCHEDOP_shutdown		2
#define SV_SCHEDOP_poll			3
/* vcpu_op(cmd, vcpuid, arg): the caller's own one-shot timer only */
#define SV_VCPUOP_set_singleshot_timer	8
#define SV_VCPUOP_stop_singleshot_timer	9
#define SV_VCPU_SSHOTTMR_future		(1u << 0)

#define SV_SHUTDOWN_poweroff		0
#define SV_SHUTDOWN_reboot		1
#define SV_SHUTDOWN_suspend		2
#define SV_SHUTDOWN_crash		3
#define SV_SHUTDOWN_watchdog		4

/* Negated in HypercallRequest.result; the values are Linux's. */
#define SV_EPERM	1
#define SV_ENOENT	2
#define SV_E2BIG	7
#define SV_EAGAIN	11
#define SV_ENOMEM	12
#define SV_EFAULT	14
#define SV_EBUSY	16
#define SV_EEXIST	17
#define SV_EINVAL	22
#define SV_ENOSPC	28
#define SV_ENOSYS	38
#define SV_ETIME	62
#define SV_ETIMEDOUT	110

/* XEN_VERSION(get_features) submap 0 */
#define SV_FEATURE_PORT_IO_HYPERCALL	(1u << 0)
#define SV_FEATURE_EVTCHN_2L		(1u << 1)
#define SV_FEATURE_GRANT_TABLE_V1	(1u << 2)
#define SV_FEATURE_SCHED_POLL		(1u << 3)
#define SV_FEATURE_CONSOLE_IO		(1u << 4)
#define SV_FEATURE_SINGLESHOT_TIMER	(1u << 5)

struct sv_hypercall_request {
	__u64 nr;
	__u64 args[6];
	__s64 result;
	__u64 _reserved[8];
};

struct sv_feature_info {
	__u32 submap_idx;
	__u32 submap;
};

struct sv_sched_shutdown {
	__u32 reason;
	__u32 exit_code;
};

struct sv_sched_poll {
	__u64 ports;
	__u32 nr_ports;
	__u32 _pad;
	__u64 timeout_ns;
};

/* Xen's vcpu_set_singleshot_timer, except that the time is relative (ns from now), as
 * sv_sched_poll's is; at expiry the vCPU's VIRQ_TIMER port becomes pending. */
struct sv_vcpu_set_singleshot_timer {
	__u64 timeout_ns;
	__u32 flags;
	__u32 _pad;
};

/*
 * memory_op (Xen's XENMEM_*): give frames back, populate them again, ask what is held.
 * The result is how many frames were done; when the first is refused, -errno (E2BIG, EINVAL,
 * EPERM, EFAULT, ENOENT: not held, EBUSY: mapped through a grant, EEXIST: held already,
 * ENOMEM: at the maximum reservation).
 */
#define SV_XENMEM_increase_reservation	0	/* not offered */
#define SV_XENMEM_decrease_reservation	1
#define SV_XENMEM_current_reservation	3	/* arg: a __u16 domid; result: pages */
#define SV_XENMEM_maximum_reservation	4	/* arg: a __u16 domid; result: pages */
#define SV_XENMEM_populate_physmap	6
#define SV_MEMORY_MAX_EXTENTS		512	/* frames per call */

struct sv_memory_reservation {
	__u64 extent_start;	/* guest address of nr_extents __u64 frame numbers */
	__u64 nr_extents;
	__u32 extent_order;	/* 0 */
	__u32 mem_flags;	/* 0 */
	__u16 domid;		/* SV_DOMID_SELF */
	__u16 _pad[3];
};

/* Store keys under the domain's home: the toolstack's target and maximum, the balloon's report
 * (all in KiB). */
#define SV_MEMORY_TARGET_KEY		"memory/target"
#define SV_MEMORY_STATIC_MAX_KEY	"memory/static-max"
#define SV_MEMORY_CURRENT_KEY		"memory/current"

/* ------------------------------------------------------------------ */
/* start_info: what the domain learns at boot                         */
/* ------------------------------------------------------------------ */

#define SV_START_INFO_MAGIC	"splitvisor-abi\0\0"	/* 16 bytes */
#define SV_START_INFO_MAGIC_LEN	16
#define SV_MAX_VCPUS		32
#define SV_MAX_GRANT_FRAMES	64
#define SV_CMDLINE_MAX		1024

#define SV_START_INFO_GPA	0x100000ull
#define SV_SHARED_INFO_GPA	0x101000ull
#define SV_CONSOLE_GPA		0x102000ull
#define SV_STORE_GPA		0x103000ull
#define SV_HYPERCALL_GPA	0x104000ull
#define SV_KERNEL_MIN_LOAD	0x200000ull
/* Free memory a domain leaves its kernel above its highest loaded address, plus per vCPU;
 * and the smallest domain (MiB) the Splitvisor guest kernel runs in. */
#define SV_KERNEL_FREE_MIN	0x400000ull
#define SV_KERNEL_FREE_PER_VCPU	0x10000ull
#define SV_MIN_MEM_MIB		9

#define SV_START_F_PVM_HOST	(1ull << 0)
#define SV_START_F_PRIVILEGED	(1ull << 1)

struct sv_start_info {
	__u8 magic[16];
	__u32 abi_major;
	__u32 abi_minor;
	__u32 domid;
	__u32 nr_vcpus;
	__u64 mem_bytes;
	__u64 mapped_bytes;
	__u64 tsc_khz;
	__u64 features;
	__u64 shared_info;
	__u64 hypercall_pages;
	__u64 grant_table;
	__u32 grant_frames;
	__u32 store_evtchn;
	__u64 store_ring;
	__u64 console_ring;
	__u32 console_evtchn;
	__u32 max_ports;
	__u64 flags;
	__u64 max_mem_bytes;	/* physical map; 0 before ABI 0.2: mem_bytes */
	__u64 _reserved[15];
	__u8 cmdline[SV_CMDLINE_MAX];
};

struct sv_vcpu_info {
	__u8 upcall_pending;
	__u8 upcall_mask;
	__u8 _pad[6];
	__u64 pending_sel;
};

struct sv_shared_info {
	struct sv_vcpu_info vcpu_info[SV_MAX_VCPUS];
	__u64 evtchn_pending[64];
	__u64 evtchn_mask[64];
};

/* ------------------------------------------------------------------ */
/* grant: v1 grant tables                                             */
/* ------------------------------------------------------------------ */

#define SV_GNTTAB_ENTRIES_PER_PAGE	512

#define SV_GTF_type_mask	0x3u
#define SV_GTF_invalid		0x0u
#define SV_GTF_permit_access	(1u << 0)
#define SV_GTF_accept_transfer	(1u << 1)
#define SV_GTF_readonly		(1u << 2)
#define SV_GTF_reading		(1u << 3)
#define SV_GTF_writing		(1u << 4)
#define SV_GTF_PWT		(1u << 5)
#define SV_GTF_PCD		(1u << 6)
#define SV_GTF_PAT		(1u << 7)
#define SV_GTF_sub_page		(1u << 8)

#define SV_DOMID_FIRST_RESERVED	0x7ff0u
#define SV_DOMID_SELF		0x7ff0u
#define SV_DOMID_IO		0x7ff1u
#define SV_DOMID_XEN		0x7ff2u
#define SV_DOMID_INVALID	0x7ff4u

#define SV_GNTST_okay			0
#define SV_GNTST_general_error		(-1)
#define SV_GNTST_bad_domain		(-2)
#define SV_GNTST_bad_gntref		(-3)
#define SV_GNTST_bad_handle		(-4)
#define SV_GNTST_bad_virt_addr		(-5)
#define SV_GNTST_bad_dev_addr		(-6)
#define SV_GNTST_no_device_space	(-7)
#define SV_GNTST_permission_denied	(-8)
#define SV_GNTST_bad_page		(-9)
#define SV_GNTST_bad_copy_arg		(-10)
#define SV_GNTST_address_too_big	(-11)
#define SV_GNTST_eagain			(-12)

struct sv_grant_entry_v1 {
	__u16 flags;
	__u16 domid;
	__u32 frame;
};

struct sv_gnttab_query_size {
	__u16 dom;
	__u16 _pad0;
	__u32 nr_frames;
	__u32 max_nr_frames;
	__s16 status;
	__u16 _pad1;
};

struct sv_gnttab_setup_table {
	__u16 dom;
	__u16 _pad0;
	__u32 nr_frames;
	__s16 status;
	__u8 _pad1[6];
	__u64 frame_list;	/* guest address of nr_frames __u64 frame numbers */
};

/* ------------------------------------------------------------------ */
/* evtchn: 2-level event channels                                     */
/* ------------------------------------------------------------------ */

/* Event port p rings with `out imm8, al` to SV_DOORBELL_BASE + p / 256, al = p % 256. */
#define SV_DOORBELL_BASE	0xc0
#define SV_DOORBELL_PORTS	16
#define SV_EVTCHN_BITS_PER_WORD	64
#define SV_EVTCHN_MAX_PORTS_2L	4096
#define SV_NR_VIRQS		24
#define SV_VIRQ_TIMER		0

#define SV_EVTCHNOP_bind_interdomain	0
#define SV_EVTCHNOP_bind_virq		1
#define SV_EVTCHNOP_close		3
#define SV_EVTCHNOP_send		4
#define SV_EVTCHNOP_status		5
#define SV_EVTCHNOP_alloc_unbound	6
#define SV_EVTCHNOP_bind_ipi		7
#define SV_EVTCHNOP_bind_vcpu		8
#define SV_EVTCHNOP_unmask		9
#define SV_EVTCHNOP_reset		10

#define SV_EVTCHNSTAT_closed		0
#define SV_EVTCHNSTAT_unbound		1
#define SV_EVTCHNSTAT_interdomain	2
#define SV_EVTCHNSTAT_pirq		3
#define SV_EVTCHNSTAT_virq		4
#define SV_EVTCHNSTAT_ipi		5

struct sv_evtchn_alloc_unbound {
	__u16 dom;
	__u16 remote_dom;
	__u32 port;
};

struct sv_evtchn_bind_interdomain {
	__u16 remote_dom;
	__u16 _pad;
	__u32 remote_port;
	__u32 local_port;
};

struct sv_evtchn_bind_virq {
	__u32 virq;
	__u32 vcpu;
	__u32 port;
};

struct sv_evtchn_bind_ipi {
	__u32 vcpu;
	__u32 port;
};

struct sv_evtchn_bind_vcpu {
	__u32 port;
	__u32 vcpu;
};

/* send, close, unmask */
struct sv_evtchn_port {
	__u32 port;
};

struct sv_evtchn_reset {
	__u16 dom;
	__u16 _pad;
};

struct sv_evtchn_status {
	__u16 dom;
	__u16 _pad;
	__u32 port;
	__u32 status;
	__u32 vcpu;
	__u8 u[8];
};

/* ------------------------------------------------------------------ */
/* ring: shared request/response rings                                */
/* ------------------------------------------------------------------ */

struct sv_sring_header {
	__u32 req_prod;
	__u32 req_event;
	__u32 rsp_prod;
	__u32 rsp_event;
	__u8 _pad[48];
};

#define SV_RING_HEADER_SIZE	64
#define SV_MAX_RING_PAGES	16

/*
 * Slots in a ring of `pages` pages whose slot is `slot` bytes: the largest
 * power of two that fits (Xen's __RING_SIZE).  A slot holds a request or,
 * once answered, its response, so `slot` is the larger of the two.
 */
#define SV_RING_FIT(pages, slot) \
	(((pages) * SV_PAGE_SIZE - SV_RING_HEADER_SIZE) / (slot))

#define SV_BLKIF_SLOT_SIZE	112
#define SV_NETIF_TX_SLOT_SIZE	12
#define SV_NETIF_RX_SLOT_SIZE	8
/* Slots of one-page rings. */
#define SV_BLKIF_RING_SLOTS_1	32
#define SV_NETIF_TX_RING_SLOTS_1	256
#define SV_NETIF_RX_RING_SLOTS_1	256

/* ------------------------------------------------------------------ */
/* blkif: the block ring                                              */
/* ------------------------------------------------------------------ */

#define SV_BLKIF_MAX_SEGMENTS_PER_REQUEST	11
#define SV_BLKIF_SEGMENTS_PER_INDIRECT_PAGE	512
#define SV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST	8
#define SV_BLKIF_MAX_INDIRECT_SEGMENTS		4096
#define SV_BLKIF_SECTORS_PER_PAGE		8

#define SV_BLKIF_OP_READ		0
#define SV_BLKIF_OP_WRITE		1
#define SV_BLKIF_OP_WRITE_BARRIER	2
#define SV_BLKIF_OP_FLUSH_DISKCACHE	3
#define SV_BLKIF_OP_RESERVED_1		4
#define SV_BLKIF_OP_DISCARD		5
#define SV_BLKIF_OP_INDIRECT		6

#define SV_BLKIF_RSP_OKAY		0
#define SV_BLKIF_RSP_ERROR		(-1)
#define SV_BLKIF_RSP_EOPNOTSUPP		(-2)

#define SV_VDISK_CDROM			(1u << 0)
#define SV_VDISK_REMOVABLE		(1u << 1)
#define SV_VDISK_READONLY		(1u << 2)

#define SV_BLKIF_DISCARD_SECURE		(1u << 0)

#define SV_BLKIF_KEY_FEATURE_FLUSH_CACHE	"feature-flush-cache"
#define SV_BLKIF_KEY_FEATURE_DISCARD		"feature-discard"
#define SV_BLKIF_KEY_FEATURE_MAX_INDIRECT_SEGMENTS "feature-max-indirect-segments"
#define SV_BLKIF_KEY_FEATURE_PERSISTENT		"feature-persistent"
#define SV_BLKIF_KEY_MULTI_QUEUE_MAX_QUEUES	"multi-queue-max-queues"
#define SV_BLKIF_KEY_MULTI_QUEUE_NUM_QUEUES	"multi-queue-num-queues"
#define SV_BLKIF_KEY_RING_PAGE_ORDER		"ring-page-order"
#define SV_BLKIF_KEY_MAX_RING_PAGE_ORDER	"max-ring-page-order"
#define SV_BLKIF_KEY_SECTORS			"sectors"
#define SV_BLKIF_KEY_SECTOR_SIZE		"sector-size"
#define SV_BLKIF_KEY_INFO			"info"
#define SV_BLKIF_KEY_RING_REF			"ring-ref"
#define SV_BLKIF_KEY_EVENT_CHANNEL		"event-channel"

struct sv_blkif_segment {
	__u32 gref;
	__u8 first_sect;
	__u8 last_sect;
	__u16 _pad;
};

/* READ, WRITE, FLUSH_DISKCACHE (optionally with data) */
struct sv_blkif_request {
	__u8 operation;
	__u8 nr_segments;
	__u16 handle;
	__u32 _pad0;
	__u64 id;
	__u64 sector_number;
	struct sv_blkif_segment seg[SV_BLKIF_MAX_SEGMENTS_PER_REQUEST];
};

struct sv_blkif_request_discard {
	__u8 operation;
	__u8 flag;
	__u16 handle;
	__u32 _pad0;
	__u64 id;
	__u64 sector_number;
	__u64 nr_sectors;
	__u8 _pad1[80];
};

struct sv_blkif_request_indirect {
	__u8 operation;
	__u8 indirect_op;
	__u16 nr_segments;
	__u32 _pad0;
	__u64 id;
	__u64 sector_number;
	__u16 handle;
	__u16 _pad1;
	__u32 indirect_grefs[SV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
	__u8 _pad2[52];
};

struct sv_blkif_response {
	__u64 id;
	__u8 operation;
	__u8 _pad0;
	__s16 status;
	__u32 _pad1;
};

/* ------------------------------------------------------------------ */
/* netif: the network rings                                           */
/* ------------------------------------------------------------------ */

#define SV_NETIF_MAX_FRAME_SIZE		65535
#define SV_NETIF_ETH_HLEN		14
#define SV_NETIF_ETH_MTU		1500
#define SV_NETIF_MAX_SLOTS_PER_FRAME	18

#define SV_NETTXF_csum_blank		(1u << 0)
#define SV_NETTXF_data_validated	(1u << 1)
#define SV_NETTXF_more_data		(1u << 2)
#define SV_NETTXF_extra_info		(1u << 3)

#define SV_NETRXF_data_validated	(1u << 0)
#define SV_NETRXF_csum_blank		(1u << 1)
#define SV_NETRXF_more_data		(1u << 2)
#define SV_NETRXF_extra_info		(1u << 3)
#define SV_NETRXF_gso_prefix		(1u << 4)

#define SV_NETIF_EXTRA_FLAG_MORE	(1u << 0)
#define SV_NETIF_EXTRA_TYPE_NONE	0
#define SV_NETIF_EXTRA_TYPE_GSO		1
#define SV_NETIF_EXTRA_TYPE_MCAST_ADD	2
#define SV_NETIF_EXTRA_TYPE_MCAST_DEL	3
#define SV_NETIF_EXTRA_TYPE_HASH	4
#define SV_NETIF_GSO_TYPE_TCPV4		1
#define SV_NETIF_GSO_TYPE_TCPV6		2

#define SV_NETIF_RSP_DROPPED		(-2)
#define SV_NETIF_RSP_ERROR		(-1)
#define SV_NETIF_RSP_OKAY		0
#define SV_NETIF_RSP_NULL		1

#define SV_NETIF_KEY_TX_RING_REF		"tx-ring-ref"
#define SV_NETIF_KEY_RX_RING_REF		"rx-ring-ref"
#define SV_NETIF_KEY_EVENT_CHANNEL		"event-channel"
#define SV_NETIF_KEY_MAC			"mac"
#define SV_NETIF_KEY_FEATURE_RX_COPY		"feature-rx-copy"
#define SV_NETIF_KEY_FEATURE_SG			"feature-sg"
#define SV_NETIF_KEY_FEATURE_GSO_TCPV4		"feature-gso-tcpv4"
#define SV_NETIF_KEY_FEATURE_NO_CSUM_OFFLOAD	"feature-no-csum-offload"
#define SV_NETIF_KEY_REQUEST_RX_COPY		"request-rx-copy"
#define SV_NETIF_KEY_MULTI_QUEUE_MAX_QUEUES	"multi-queue-max-queues"

struct sv_netif_tx_request {
	__u32 gref;
	__u16 offset;
	__u16 flags;
	__u16 id;
	__u16 size;
};

struct sv_netif_tx_response {
	__u16 id;
	__s16 status;
};

/* Occupies a TX request or RX response slot. */
struct sv_netif_extra_info {
	__u8 extra_type;
	__u8 flags;
	__u8 u[6];
};

struct sv_netif_rx_request {
	__u16 id;
	__u16 _pad;
	__u32 gref;
};

struct sv_netif_rx_response {
	__u16 id;
	__u16 offset;
	__u16 flags;
	__s16 status;
};

/* ------------------------------------------------------------------ */
/* store: xenstore wire protocol and interface page                   */
/* ------------------------------------------------------------------ */

#define SV_XS_PAYLOAD_MAX	4096
#define SV_XS_ABS_PATH_MAX	3072
#define SV_XS_REL_PATH_MAX	2048
#define SV_XS_RING_SIZE		1024

#define SV_XS_CONTROL			0
#define SV_XS_DIRECTORY			1
#define SV_XS_READ			2
#define SV_XS_GET_PERMS			3
#define SV_XS_WATCH			4
#define SV_XS_UNWATCH			5
#define SV_XS_TRANSACTION_START		6
#define SV_XS_TRANSACTION_END		7
#define SV_XS_INTRODUCE			8
#define SV_XS_RELEASE			9
#define SV_XS_GET_DOMAIN_PATH		10
#define SV_XS_WRITE			11
#define SV_XS_MKDIR			12
#define SV_XS_RM			13
#define SV_XS_SET_PERMS			14
#define SV_XS_WATCH_EVENT		15
#define SV_XS_ERROR			16
#define SV_XS_IS_DOMAIN_INTRODUCED	17
#define SV_XS_RESUME			18
#define SV_XS_SET_TARGET		19
#define SV_XS_RESET_WATCHES		21
#define SV_XS_DIRECTORY_PART		22

#define SV_XS_SERVER_F_RECONNECTION	(1u << 0)
#define SV_XS_SERVER_F_ERROR		(1u << 1)
#define SV_XS_CONNECTED			0
#define SV_XS_RECONNECT			1
#define SV_XS_ERROR_NONE		0
#define SV_XS_ERROR_COMM		1
#define SV_XS_ERROR_RINGIDX		2
#define SV_XS_ERROR_PROTO		3

/*
 * The error names an XS_ERROR answer carries, in pv-protocol's order, as an
 * X-macro: X(EINVAL) expands with the errno symbol of the including side
 * (the kernel's <linux/errno.h>, or <errno.h> in user space).
 */
#define SV_XS_ERRORS(X)	\
	X(EINVAL)	\
	X(EACCES)	\
	X(EEXIST)	\
	X(EISDIR)	\
	X(ENOENT)	\
	X(ENOMEM)	\
	X(ENOSPC)	\
	X(EIO)		\
	X(ENOTEMPTY)	\
	X(ENOSYS)	\
	X(EROFS)	\
	X(EBUSY)	\
	X(EAGAIN)	\
	X(EISCONN)	\
	X(E2BIG)	\
	X(EPERM)

struct sv_xs_msg_header {
	__u32 msg_type;
	__u32 req_id;
	__u32 tx_id;
	__u32 len;
};

struct sv_xs_interface {
	char req[SV_XS_RING_SIZE];
	char rsp[SV_XS_RING_SIZE];
	__u32 req_cons;
	__u32 req_prod;
	__u32 rsp_cons;
	__u32 rsp_prod;
	__u32 server_features;
	__u32 connection;
	__u32 error;
};

/* ------------------------------------------------------------------ */
/* XenbusState: the device handshake values in <dir>/state            */
/* ------------------------------------------------------------------ */

#define SV_XENBUS_STATE_UNKNOWN		0
#define SV_XENBUS_STATE_INITIALISING	1
#define SV_XENBUS_STATE_INIT_WAIT	2
#define SV_XENBUS_STATE_INITIALISED	3
#define SV_XENBUS_STATE_CONNECTED	4
#define SV_XENBUS_STATE_CLOSING		5
#define SV_XENBUS_STATE_CLOSED		6
#define SV_XENBUS_STATE_RECONFIGURING	7
#define SV_XENBUS_STATE_RECONFIGURED	8

/* Self-checks that need no Rust; the full check is tests/tests/c_header.rs. */
_Static_assert(sizeof(struct sv_hypercall_request) == 128, "sv_hypercall_request");
_Static_assert(sizeof(struct sv_start_info) <= SV_PAGE_SIZE, "sv_start_info");
_Static_assert(sizeof(struct sv_shared_info) <= SV_PAGE_SIZE, "sv_shared_info");
_Static_assert(sizeof(struct sv_blkif_request) == SV_BLKIF_SLOT_SIZE, "blkif slot");
_Static_assert(sizeof(struct sv_blkif_request_discard) == SV_BLKIF_SLOT_SIZE, "discard slot");
_Static_assert(sizeof(struct sv_blkif_request_indirect) == SV_BLKIF_SLOT_SIZE, "indirect slot");
_Static_assert(sizeof(struct sv_netif_tx_request) == SV_NETIF_TX_SLOT_SIZE, "tx slot");
_Static_assert(sizeof(struct sv_netif_rx_response) == SV_NETIF_RX_SLOT_SIZE, "rx slot");
_Static_assert(sizeof(struct sv_netif_extra_info) == SV_NETIF_RX_SLOT_SIZE, "extra slot");

#endif /* SPLITVISOR_ABI_H */
