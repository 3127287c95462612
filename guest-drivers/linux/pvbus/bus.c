// SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause
/*
 * The "splitvisor" bus: one device per front-end directory the toolstack
 * writes under <home>/device/vbd/<id> and <home>/device/vif/<id>.
 *
 * A watch on <home>/device adds devices that appear (in state
 * Initialising) and unregisters devices whose directory vanished.  Binding
 * a driver reads the back end's directory and id, calls the driver's probe,
 * then watches <backend>/state and passes every change to the driver's
 * otherend_changed (the XenbusState handshake is the driver's; this file
 * offers pvbus_switch_state() and friends).  All watch callbacks run in
 * the pvbus watch thread, so device addition, removal and state changes
 * are serialised.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/device.h>
#include <linux/err.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/string.h>

#include "pvbus.h"

static const char *const pvbus_devicetypes[] = { "vbd", "vif" };

static const char *const pvbus_state_names[] = {
	[PVBUS_STATE_UNKNOWN] = "Unknown",
	[PVBUS_STATE_INITIALISING] = "Initialising",
	[PVBUS_STATE_INIT_WAIT] = "InitWait",
	[PVBUS_STATE_INITIALISED] = "Initialised",
	[PVBUS_STATE_CONNECTED] = "Connected",
	[PVBUS_STATE_CLOSING] = "Closing",
	[PVBUS_STATE_CLOSED] = "Closed",
	[PVBUS_STATE_RECONFIGURING] = "Reconfiguring",
	[PVBUS_STATE_RECONFIGURED] = "Reconfigured",
};

const char *pvbus_state_name(enum pvbus_state state)
{
	if ((unsigned int)state >= ARRAY_SIZE(pvbus_state_names))
		return "Invalid";
	return pvbus_state_names[state];
}
EXPORT_SYMBOL_GPL(pvbus_state_name);

enum pvbus_state pvbus_read_state(const char *path)
{
	unsigned int v;

	if (pvbus_xs_read_uint(PVBUS_XS_NO_TX, path, "state", &v) ||
	    v > PVBUS_STATE_RECONFIGURED)
		return PVBUS_STATE_UNKNOWN;
	return v;
}
EXPORT_SYMBOL_GPL(pvbus_read_state);

int pvbus_switch_state(struct pvbus_device *dev, enum pvbus_state state)
{
	pvbus_xs_tx_t tx;
	char *cur;
	int ret;

	if (state == dev->state)
		return 0;
again:
	ret = pvbus_xs_transaction_start(&tx);
	if (ret)
		goto fail;
	/* Never recreate a directory the toolstack removed. */
	cur = pvbus_xs_read(tx, dev->nodename, "state", NULL);
	if (IS_ERR(cur)) {
		pvbus_xs_transaction_end(tx, true);
		ret = PTR_ERR(cur);
		if (ret == -ENOENT)
			return 0;
		goto fail;
	}
	kfree(cur);
	ret = pvbus_xs_printf(tx, dev->nodename, "state", "%d", state);
	if (ret) {
		pvbus_xs_transaction_end(tx, true);
		goto fail;
	}
	ret = pvbus_xs_transaction_end(tx, false);
	if (ret == -EAGAIN)
		goto again;
	if (ret)
		goto fail;
	dev_dbg(&dev->dev, "state %s -> %s\n", pvbus_state_name(dev->state),
		pvbus_state_name(state));
	dev->state = state;
	return 0;
fail:
	dev_err(&dev->dev, "cannot switch to %s: %d\n",
		pvbus_state_name(state), ret);
	return ret;
}
EXPORT_SYMBOL_GPL(pvbus_switch_state);

void pvbus_dev_fatal(struct pvbus_device *dev, int err, const char *fmt, ...)
{
	struct va_format vaf;
	va_list ap;

	va_start(ap, fmt);
	vaf.fmt = fmt;
	vaf.va = &ap;
	dev_err(&dev->dev, "%pV: %d\n", &vaf, err);
	va_end(ap);
	pvbus_switch_state(dev, PVBUS_STATE_CLOSING);
}
EXPORT_SYMBOL_GPL(pvbus_dev_fatal);

/* ---- the bus ---- */

static int pvbus_match(struct device *dev, struct device_driver *drv)
{
	return !strcmp(to_pvbus_device(dev)->devicetype,
		       to_pvbus_driver(drv)->devicetype);
}

static int pvbus_uevent(struct device *dev, struct kobj_uevent_env *env)
{
	struct pvbus_device *pdev = to_pvbus_device(dev);

	if (add_uevent_var(env, "MODALIAS=splitvisor:%s", pdev->devicetype))
		return -ENOMEM;
	if (add_uevent_var(env, "SPLITVISOR_NODENAME=%s", pdev->nodename))
		return -ENOMEM;
	return 0;
}

static void pvbus_otherend_changed(struct pvbus_watch *watch,
				   const char *path)
{
	struct pvbus_device *pdev =
		container_of(watch, struct pvbus_device, otherend_watch);
	struct pvbus_driver *drv = to_pvbus_driver(pdev->dev.driver);
	enum pvbus_state state = pvbus_read_state(pdev->otherend);

	dev_dbg(&pdev->dev, "back end %s is %s\n", pdev->otherend,
		pvbus_state_name(state));
	if (drv->otherend_changed)
		drv->otherend_changed(pdev, state);
}

static int pvbus_dev_probe(struct device *dev)
{
	struct pvbus_device *pdev = to_pvbus_device(dev);
	struct pvbus_driver *drv = to_pvbus_driver(dev->driver);
	unsigned int id = 0;
	char *backend;
	int ret;

	backend = pvbus_xs_read(PVBUS_XS_NO_TX, pdev->nodename, "backend",
				NULL);
	if (IS_ERR(backend)) {
		dev_err(dev, "no back end named in %s: %ld\n", pdev->nodename,
			PTR_ERR(backend));
		return PTR_ERR(backend);
	}
	ret = pvbus_xs_read_uint(PVBUS_XS_NO_TX, pdev->nodename, "backend-id",
				 &id);
	if (ret || id >= SV_DOMID_FIRST_RESERVED || backend[0] != '/') {
		dev_err(dev, "bad back end \"%s\" in domain %u: %d\n",
			backend, id, ret);
		ret = ret ?: -EINVAL;
		goto err_backend;
	}
	pdev->otherend = backend;
	pdev->otherend_id = id;
	pdev->otherend_watch.path = kasprintf(GFP_KERNEL, "%s/state", backend);
	if (!pdev->otherend_watch.path) {
		ret = -ENOMEM;
		goto err_backend;
	}
	pdev->otherend_watch.callback = pvbus_otherend_changed;

	ret = drv->probe(pdev);
	if (ret)
		goto err_path;
	/* Fires once at once: the driver learns the back end's state. */
	ret = pvbus_watch_register(&pdev->otherend_watch);
	if (ret) {
		dev_err(dev, "cannot watch %s: %d\n",
			pdev->otherend_watch.path, ret);
		if (drv->remove)
			drv->remove(pdev);
		goto err_path;
	}
	return 0;

err_path:
	kfree(pdev->otherend_watch.path);
	pdev->otherend_watch.path = NULL;
err_backend:
	pdev->otherend = NULL;
	kfree(backend);
	return ret;
}

static void pvbus_dev_remove(struct device *dev)
{
	struct pvbus_device *pdev = to_pvbus_device(dev);
	struct pvbus_driver *drv = to_pvbus_driver(dev->driver);

	pvbus_watch_unregister(&pdev->otherend_watch);
	if (drv->remove)
		drv->remove(pdev);
	pvbus_switch_state(pdev, PVBUS_STATE_CLOSED);
	kfree(pdev->otherend_watch.path);
	pdev->otherend_watch.path = NULL;
	kfree(pdev->otherend);
	pdev->otherend = NULL;
}

static ssize_t nodename_show(struct device *dev, struct device_attribute *attr,
			     char *buf)
{
	return sysfs_emit(buf, "%s\n", to_pvbus_device(dev)->nodename);
}
static DEVICE_ATTR_RO(nodename);

static ssize_t devtype_show(struct device *dev, struct device_attribute *attr,
			    char *buf)
{
	return sysfs_emit(buf, "%s\n", to_pvbus_device(dev)->devicetype);
}
static DEVICE_ATTR_RO(devtype);

static ssize_t state_show(struct device *dev, struct device_attribute *attr,
			  char *buf)
{
	return sysfs_emit(buf, "%s\n",
			  pvbus_state_name(to_pvbus_device(dev)->state));
}
static DEVICE_ATTR_RO(state);

static struct attribute *pvbus_dev_attrs[] = {
	&dev_attr_nodename.attr,
	&dev_attr_devtype.attr,
	&dev_attr_state.attr,
	NULL,
};
ATTRIBUTE_GROUPS(pvbus_dev);

static struct bus_type pvbus_bus = {
	.name = "splitvisor",
	.match = pvbus_match,
	.uevent = pvbus_uevent,
	.probe = pvbus_dev_probe,
	.remove = pvbus_dev_remove,
	.dev_groups = pvbus_dev_groups,
};

int __pvbus_register_driver(struct pvbus_driver *drv, struct module *owner,
			    const char *mod_name)
{
	if (!drv->driver.name)
		drv->driver.name = mod_name;
	drv->driver.bus = &pvbus_bus;
	drv->driver.owner = owner;
	drv->driver.mod_name = mod_name;
	return driver_register(&drv->driver);
}
EXPORT_SYMBOL_GPL(__pvbus_register_driver);

void pvbus_unregister_driver(struct pvbus_driver *drv)
{
	driver_unregister(&drv->driver);
}
EXPORT_SYMBOL_GPL(pvbus_unregister_driver);

/* ---- finding devices ---- */

static void pvbus_dev_release(struct device *dev)
{
	struct pvbus_device *pdev = to_pvbus_device(dev);

	kfree(pdev->nodename);
	kfree(pdev);
}

static int pvbus_match_nodename(struct device *dev, const void *nodename)
{
	return !strcmp(to_pvbus_device(dev)->nodename, nodename);
}

static int pvbus_match_gone(struct device *dev, const void *unused)
{
	unsigned int n;
	char **d;

	/* Only a definite "no such node" counts: not a store failure. */
	d = pvbus_xs_directory(PVBUS_XS_NO_TX, to_pvbus_device(dev)->nodename,
			       NULL, &n);
	if (IS_ERR(d))
		return PTR_ERR(d) == -ENOENT;
	kfree(d);
	return 0;
}

static void pvbus_add_device(const char *type, const char *id)
{
	struct pvbus_device *pdev;
	struct device *dev;
	char *nodename;
	int ret;

	nodename = kasprintf(GFP_KERNEL, "%s/device/%s/%s", pvbus_home, type,
			     id);
	if (!nodename)
		return;
	dev = bus_find_device(&pvbus_bus, NULL, nodename,
			      pvbus_match_nodename);
	if (dev) {
		put_device(dev);
		kfree(nodename);
		return;
	}
	/* A directory in any other state is being set up or torn down. */
	if (pvbus_read_state(nodename) != PVBUS_STATE_INITIALISING) {
		kfree(nodename);
		return;
	}
	pdev = kzalloc(sizeof(*pdev), GFP_KERNEL);
	if (!pdev) {
		kfree(nodename);
		return;
	}
	pdev->nodename = nodename;
	pdev->devicetype = type;
	pdev->state = PVBUS_STATE_INITIALISING;
	pdev->dev.bus = &pvbus_bus;
	pdev->dev.release = pvbus_dev_release;
	ret = dev_set_name(&pdev->dev, "%s-%s", type, id);
	if (!ret)
		ret = device_register(&pdev->dev);
	if (ret) {
		pr_warn("cannot add device %s: %d\n", nodename, ret);
		/* Frees pdev and nodename through the release function. */
		put_device(&pdev->dev);
	}
}

static void pvbus_scan(void)
{
	struct device *dev;
	unsigned int i, j, n;
	char **ids, *dir;

	/* Devices whose directory is gone first, so an id can come back. */
	while ((dev = bus_find_device(&pvbus_bus, NULL, NULL,
				      pvbus_match_gone))) {
		dev_info(dev, "front-end directory removed\n");
		device_unregister(dev);
		put_device(dev);
	}
	for (i = 0; i < ARRAY_SIZE(pvbus_devicetypes); i++) {
		dir = kasprintf(GFP_KERNEL, "%s/device/%s", pvbus_home,
				pvbus_devicetypes[i]);
		if (!dir)
			return;
		ids = pvbus_xs_directory(PVBUS_XS_NO_TX, dir, NULL, &n);
		kfree(dir);
		if (IS_ERR(ids))
			continue;	/* -ENOENT: no device of this type */
		for (j = 0; j < n; j++)
			pvbus_add_device(pvbus_devicetypes[i], ids[j]);
		kfree(ids);
	}
}

static struct pvbus_watch pvbus_device_watch;

/* Rescans on changes at <home>/device, <home>/device/<type>[/<id>]. */
static void pvbus_device_changed(struct pvbus_watch *watch, const char *path)
{
	size_t root = strlen(watch->path);
	const char *rest;

	if (strncmp(path, watch->path, root))
		return;
	rest = path + root;
	if (*rest && *rest != '/')
		return;
	/* rest is "", "/<type>" or "/<type>/<id>"; deeper is a device's key. */
	if (*rest && strchr(rest + 1, '/') &&
	    strchr(strchr(rest + 1, '/') + 1, '/'))
		return;
	pvbus_scan();
}

int pvbus_bus_init(void)
{
	int ret;

	ret = bus_register(&pvbus_bus);
	if (ret)
		return ret;
	pvbus_device_watch.path = kasprintf(GFP_KERNEL, "%s/device",
					    pvbus_home);
	if (!pvbus_device_watch.path) {
		ret = -ENOMEM;
		goto err_bus;
	}
	pvbus_device_watch.callback = pvbus_device_changed;
	/* Its first event, at once, runs the first scan. */
	ret = pvbus_watch_register(&pvbus_device_watch);
	if (ret)
		goto err_path;
	return 0;

err_path:
	kfree(pvbus_device_watch.path);
err_bus:
	bus_unregister(&pvbus_bus);
	return ret;
}

void pvbus_bus_exit(void)
{
	struct device *dev;

	pvbus_watch_unregister(&pvbus_device_watch);
	kfree(pvbus_device_watch.path);
	/* Front-end modules are gone (they use our symbols): no drivers. */
	while ((dev = bus_find_next_device(&pvbus_bus, NULL))) {
		device_unregister(dev);
		put_device(dev);
	}
	bus_unregister(&pvbus_bus);
}
