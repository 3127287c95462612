/* SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause */
/*
 * pvbus: the Splitvisor platform for Linux front-end drivers.
 *
 * pvbus detects Splitvisor (CPUID leaves, see abi.h), issues hypercalls,
 * owns the grant table and the event-channel upcall, talks to the config
 * store, and presents each device the toolstack announces under
 * device/vbd and device/vif as a struct pvbus_device on the "splitvisor"
 * bus.  Front-end drivers (pvblk, pvnet) bind to those devices and drive
 * the XenbusState handshake with their back ends.
 *
 * This is the in-kernel API those drivers use; it is not a user-space ABI.
 */
#ifndef SPLITVISOR_PVBUS_H
#define SPLITVISOR_PVBUS_H

#include <linux/device.h>
#include <linux/list.h>
#include <linux/mm_types.h>
#include <linux/types.h>
#include <splitvisor/abi.h>

typedef u16 pvbus_domid_t;
typedef u32 pvbus_gref_t;

/* ---- platform and hypercalls ---------------------------------------- */

pvbus_domid_t pvbus_self_domid(void);

/*
 * Hypercall @nr with sub-op @cmd.  @arg (@len bytes, may be NULL/0) is
 * copied into this vCPU's hypercall scratch space, its guest address is
 * passed as the second argument, and the hypervisor's output is copied back
 * into @arg.  Returns the hypercall's result: >= 0, or a negative errno.
 * Callable from any context; runs with interrupts disabled for the
 * duration of the exit.
 */
long pvbus_hypercall(u64 nr, u64 cmd, void *arg, size_t len);

/* ---- grant table ----------------------------------------------------- */

/* Reserve @count references (all or none); -ENOSPC if the table is short. */
int pvbus_gnttab_alloc_refs(unsigned int count, pvbus_gref_t *refs);
/* Return references that grant nothing (never granted, or ended). */
void pvbus_gnttab_free_refs(const pvbus_gref_t *refs, unsigned int count);
/* Let @domid map frame @gfn through @ref, read-only if @readonly. */
void pvbus_gnttab_grant(pvbus_gref_t ref, pvbus_domid_t domid,
			unsigned long gfn, bool readonly);
/*
 * Revoke @ref.  Fails (false, entry unchanged) while the grantee has it
 * mapped; the page must then stay away from any other use.
 */
bool pvbus_gnttab_end_access(pvbus_gref_t ref);
/*
 * Revoke @ref and free it, and then @page (may be NULL) - at once if the
 * grantee holds no mapping, else later, from a worker that retries until
 * the grantee lets go.  The caller gives up both.
 */
void pvbus_gnttab_end_access_free(pvbus_gref_t ref, struct page *page);

/* ---- event channels -------------------------------------------------- */

/*
 * Called in hard-interrupt context (the upcall interrupt, or the polling
 * timer when the platform offers no upcall) with the port's pending bit
 * already cleared.  Must not sleep.
 */
typedef void (*pvbus_evtchn_handler_t)(unsigned int port, void *data);

/* A new port of ours that domain @remote may bind (EVTCHNOP_alloc_unbound). */
int pvbus_evtchn_alloc_unbound(pvbus_domid_t remote, unsigned int *port);
/* Install @handler for @port and unmask it. */
int pvbus_evtchn_bind(unsigned int port, pvbus_evtchn_handler_t handler,
		      void *data, const char *name);
/* Mask @port and remove its handler; returns once no handler runs. */
void pvbus_evtchn_unbind(unsigned int port);
/* EVTCHNOP_close. */
int pvbus_evtchn_close(unsigned int port);
/* Signal the remote end of @port (its doorbell; no exit to the VMM for
 * ports the host serves). */
void pvbus_evtchn_notify(unsigned int port);

/* ---- config store ---------------------------------------------------- */

/* Transaction ids: 0 is "no transaction". */
typedef u32 pvbus_xs_tx_t;
#define PVBUS_XS_NO_TX 0

/* Paths are "<dir>/<node>", or <dir> alone if @node is "" or NULL. */
char *pvbus_xs_read(pvbus_xs_tx_t tx, const char *dir, const char *node,
		    unsigned int *len);	/* kfree() it; ERR_PTR on error */
int pvbus_xs_write(pvbus_xs_tx_t tx, const char *dir, const char *node,
		   const char *value);
__printf(4, 5)
int pvbus_xs_printf(pvbus_xs_tx_t tx, const char *dir, const char *node,
		    const char *fmt, ...);
int pvbus_xs_read_uint(pvbus_xs_tx_t tx, const char *dir, const char *node,
		       unsigned int *value);
unsigned int pvbus_xs_read_uint_default(const char *dir, const char *node,
					unsigned int def);
/* NULL-terminated array of names in one allocation; kfree() it. */
char **pvbus_xs_directory(pvbus_xs_tx_t tx, const char *dir,
			  const char *node, unsigned int *num);
int pvbus_xs_rm(pvbus_xs_tx_t tx, const char *dir, const char *node);
bool pvbus_xs_exists(const char *dir, const char *node);
int pvbus_xs_transaction_start(pvbus_xs_tx_t *tx);
/* -EAGAIN: another writer got in first; redo the transaction. */
int pvbus_xs_transaction_end(pvbus_xs_tx_t tx, bool abort);

struct pvbus_watch {
	struct list_head list;		/* private to pvbus */
	u32 token;			/* private to pvbus */
	const char *path;		/* absolute */
	/* Runs in the pvbus watch thread; may sleep and use the store. */
	void (*callback)(struct pvbus_watch *watch, const char *path);
};

/* The watch fires once at once, then on every change at or below path. */
int pvbus_watch_register(struct pvbus_watch *watch);
/* Returns once the callback no longer runs (unless called from it). */
void pvbus_watch_unregister(struct pvbus_watch *watch);

/* ---- devices and drivers -------------------------------------------- */

enum pvbus_state {
	PVBUS_STATE_UNKNOWN = SV_XENBUS_STATE_UNKNOWN,
	PVBUS_STATE_INITIALISING = SV_XENBUS_STATE_INITIALISING,
	PVBUS_STATE_INIT_WAIT = SV_XENBUS_STATE_INIT_WAIT,
	PVBUS_STATE_INITIALISED = SV_XENBUS_STATE_INITIALISED,
	PVBUS_STATE_CONNECTED = SV_XENBUS_STATE_CONNECTED,
	PVBUS_STATE_CLOSING = SV_XENBUS_STATE_CLOSING,
	PVBUS_STATE_CLOSED = SV_XENBUS_STATE_CLOSED,
	PVBUS_STATE_RECONFIGURING = SV_XENBUS_STATE_RECONFIGURING,
	PVBUS_STATE_RECONFIGURED = SV_XENBUS_STATE_RECONFIGURED,
};

const char *pvbus_state_name(enum pvbus_state state);

struct pvbus_device {
	const char *devicetype;		/* "vbd", "vif" */
	const char *nodename;		/* our directory in the store */
	const char *otherend;		/* the back end's directory */
	pvbus_domid_t otherend_id;
	enum pvbus_state state;		/* last state we wrote */
	struct pvbus_watch otherend_watch;
	struct device dev;
};

static inline struct pvbus_device *to_pvbus_device(struct device *dev)
{
	return container_of(dev, struct pvbus_device, dev);
}

struct pvbus_driver {
	const char *devicetype;
	/* Runs with the back end's directory and its id known. */
	int (*probe)(struct pvbus_device *dev);
	/*
	 * The back end's state changed (also called once right after probe).
	 * Runs in the pvbus watch thread.
	 */
	void (*otherend_changed)(struct pvbus_device *dev,
				 enum pvbus_state backend_state);
	/* Tear everything down; the device is going away. */
	void (*remove)(struct pvbus_device *dev);
	struct device_driver driver;
};

static inline struct pvbus_driver *to_pvbus_driver(struct device_driver *drv)
{
	return container_of(drv, struct pvbus_driver, driver);
}

int __pvbus_register_driver(struct pvbus_driver *drv, struct module *owner,
			    const char *mod_name);
#define pvbus_register_driver(drv) \
	__pvbus_register_driver(drv, THIS_MODULE, KBUILD_MODNAME)
void pvbus_unregister_driver(struct pvbus_driver *drv);

/* Write @state to <nodename>/state (no-op if it is already there). */
int pvbus_switch_state(struct pvbus_device *dev, enum pvbus_state state);
/* Read <path>/state; PVBUS_STATE_UNKNOWN if absent or garbled. */
enum pvbus_state pvbus_read_state(const char *path);
/* Log @err with a reason, and tell the back end we are closing. */
__printf(3, 4)
void pvbus_dev_fatal(struct pvbus_device *dev, int err, const char *fmt, ...);

#endif /* SPLITVISOR_PVBUS_H */
