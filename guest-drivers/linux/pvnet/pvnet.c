// SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause
/*
 * pvnet: network front end for Splitvisor virtual interfaces
 * (device/vif/<id>), a netdev over one TX and one RX netif ring sharing an
 * event channel, with NAPI.
 *
 * As in pvblk, frame data lives in the driver's own pages, granted to the
 * back end once per ring slot: TX copies each frame (head and fragments -
 * the stack may hand us scatter-gather skbs) into as many 4 KiB slot pages
 * as it needs, chained with NETTXF_more_data when the back end takes
 * multi-slot frames (feature-sg); RX posts a page per slot, the back end
 * copies frames into them (request-rx-copy), and NAPI copies the data into
 * a fresh skb (first slot linear, further slots as page fragments) and
 * re-posts the page.  The back end never maps a page the stack owns.
 *
 * Checksums: NETIF_F_IP_CSUM sends IPv4 TCP/UDP frames with a blank
 * checksum as NETTXF_csum_blank | NETTXF_data_validated (the back end or the
 * final receiver fills it in); anything else CHECKSUM_PARTIAL is resolved
 * here first.  On RX, NETRXF_csum_blank becomes CHECKSUM_PARTIAL (after
 * skb_checksum_setup) and NETRXF_data_validated CHECKSUM_UNNECESSARY.
 *
 * Responses are hostile: a TX response must name an id in flight; RX
 * responses must come in ring order (their id is their slot) and stay in
 * their page.  A violation breaks the rings and closes the device.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/etherdevice.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/netdevice.h>
#include <linux/rtnetlink.h>
#include <linux/skbuff.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/workqueue.h>
#include <splitvisor/pvbus.h>
#include <splitvisor/pvring.h>

#define PVNET_TX_SLOTS	SV_NETIF_TX_RING_SLOTS_1
#define PVNET_RX_SLOTS	SV_NETIF_RX_RING_SLOTS_1
/* Data slots plus extra-info slots one RX frame may take. */
#define PVNET_RX_MAX_CHAIN	(SV_NETIF_MAX_SLOTS_PER_FRAME + 3)

/* An RX response slot: a data response or an extra-info slot. */
union pvnet_rx_slot {
	struct sv_netif_rx_response rsp;
	struct sv_netif_extra_info extra;
};

struct pvnet_gpage {
	struct page *page;	/* NULL: not allocated */
	pvbus_gref_t ref;
};

struct pvnet_info {
	struct net_device *netdev;
	struct pvbus_device *pdev;
	struct mutex mutex;	/* the handshake: setup, connect, teardown */
	struct napi_struct napi;
	bool registered;	/* netdev registered */
	bool sg;		/* the back end takes multi-slot TX frames */

	/* TX: tx_lock, against NAPI's completion handling and teardown. */
	spinlock_t tx_lock;
	struct pvring_front tx;
	struct pvnet_gpage tx_ring;
	struct pvnet_gpage tx_bufs[PVNET_TX_SLOTS];	/* by id */
	bool tx_in_flight[PVNET_TX_SLOTS];
	u16 tx_free[PVNET_TX_SLOTS];
	unsigned int tx_nr_free;
	unsigned int tx_max_slots;	/* slots one frame may need */

	/* RX: NAPI only (setup and teardown run with NAPI off). */
	struct pvring_front rx;
	struct pvnet_gpage rx_ring;
	struct pvnet_gpage rx_bufs[PVNET_RX_SLOTS];	/* by ring slot */
	bool rx_waiting;	/* a frame's chain is only partly published */
	u32 rx_seen;		/* the rsp_prod it was seen at */

	unsigned int evtchn;
	bool evtchn_allocated;
	bool evtchn_bound;
	bool rings;		/* setup done: rings and buffers exist */
	bool connected;		/* under tx_lock: traffic may flow */
	bool broken;		/* the back end broke the protocol */
	struct work_struct fatal_work;

	/* Counters: TX ones under tx_lock, RX ones in NAPI. */
	u64 tx_packets, tx_bytes, tx_errors;
	u64 rx_packets, rx_bytes, rx_errors, rx_dropped;
	atomic_long_t tx_dropped;
};

static int pvnet_grant_page(struct pvnet_gpage *g, pvbus_domid_t backend,
			    bool readonly)
{
	struct page *page = alloc_page(GFP_KERNEL | __GFP_ZERO);

	if (!page)
		return -ENOMEM;
	if (pvbus_gnttab_alloc_refs(1, &g->ref)) {
		__free_page(page);
		return -ENOSPC;
	}
	pvbus_gnttab_grant(g->ref, backend, page_to_pfn(page), readonly);
	g->page = page;
	return 0;
}

static void pvnet_ungrant_page(struct pvnet_gpage *g)
{
	if (!g->page)
		return;
	pvbus_gnttab_end_access_free(g->ref, g->page);
	g->page = NULL;
}

/* ---- TX ---- */

static netdev_tx_t pvnet_start_xmit(struct sk_buff *skb,
				    struct net_device *dev)
{
	struct pvnet_info *info = netdev_priv(dev);
	unsigned int len = skb->len, nslots, i, off, n;
	u16 ids[SV_NETIF_MAX_SLOTS_PER_FRAME];
	struct sv_netif_tx_request req;
	u16 csum_flags = 0;
	unsigned long flags;
	bool notify;

	if (len < ETH_HLEN || len > SV_NETIF_MAX_FRAME_SIZE)
		goto drop;
	nslots = DIV_ROUND_UP(len, PAGE_SIZE);
	if (nslots > info->tx_max_slots)
		goto drop;
	if (skb->ip_summed == CHECKSUM_PARTIAL) {
		if (skb->protocol == htons(ETH_P_IP) &&
		    (ip_hdr(skb)->protocol == IPPROTO_TCP ||
		     ip_hdr(skb)->protocol == IPPROTO_UDP))
			csum_flags = SV_NETTXF_csum_blank |
				     SV_NETTXF_data_validated;
		else if (skb_checksum_help(skb))
			goto drop;
	} else if (skb->ip_summed == CHECKSUM_UNNECESSARY) {
		csum_flags = SV_NETTXF_data_validated;
	}

	spin_lock_irqsave(&info->tx_lock, flags);
	if (!info->connected || info->broken) {
		spin_unlock_irqrestore(&info->tx_lock, flags);
		goto drop;
	}
	if (info->tx_nr_free < nslots) {
		/* Stopped below the threshold: should not happen. */
		netif_stop_queue(dev);
		spin_unlock_irqrestore(&info->tx_lock, flags);
		return NETDEV_TX_BUSY;
	}
	for (i = 0; i < nslots; i++)
		ids[i] = info->tx_free[--info->tx_nr_free];
	spin_unlock_irqrestore(&info->tx_lock, flags);

	/*
	 * The ids are ours and teardown waits for us (netif_tx_disable), so
	 * their pages can be filled without the lock.
	 */
	for (i = 0, off = 0; i < nslots; i++, off += n) {
		n = min_t(unsigned int, len - off, PAGE_SIZE);
		if (skb_copy_bits(skb, off, page_address(info->tx_bufs[ids[i]].page),
				  n))
			WARN_ON_ONCE(1);	/* off + n <= skb->len */
	}

	spin_lock_irqsave(&info->tx_lock, flags);
	if (!info->connected || info->broken) {
		/* Torn down meanwhile: the ids go back, the frame is dropped. */
		for (i = 0; i < nslots; i++)
			info->tx_free[info->tx_nr_free++] = ids[i];
		spin_unlock_irqrestore(&info->tx_lock, flags);
		goto drop;
	}
	for (i = 0, off = 0; i < nslots; i++, off += n) {
		n = min_t(unsigned int, len - off, PAGE_SIZE);
		req.gref = info->tx_bufs[ids[i]].ref;
		req.offset = 0;
		req.flags = (i == 0 ? csum_flags : 0) |
			    (i + 1 < nslots ? SV_NETTXF_more_data : 0);
		req.id = ids[i];
		/* The first slot carries the whole frame's size. */
		req.size = i == 0 ? len : n;
		memcpy(pvring_next_request(&info->tx), &req, sizeof(req));
		info->tx_in_flight[ids[i]] = true;
	}
	notify = pvring_push_requests(&info->tx);
	info->tx_packets++;
	info->tx_bytes += len;
	if (info->tx_nr_free < info->tx_max_slots)
		netif_stop_queue(dev);
	spin_unlock_irqrestore(&info->tx_lock, flags);
	if (notify)
		pvbus_evtchn_notify(info->evtchn);
	skb_tx_timestamp(skb);
	dev_consume_skb_any(skb);
	return NETDEV_TX_OK;

drop:
	atomic_long_inc(&info->tx_dropped);
	dev_kfree_skb_any(skb);
	return NETDEV_TX_OK;
}

/* Takes TX responses; false if the back end broke the protocol. */
static bool pvnet_tx_gc(struct pvnet_info *info)
{
	struct sv_netif_tx_response rsp;
	unsigned long flags;
	bool ok = true;
	u32 prod;

	spin_lock_irqsave(&info->tx_lock, flags);
	do {
		if (pvring_rsp_prod(&info->tx, &prod)) {
			ok = false;
			break;
		}
		while (info->tx.rsp_cons != prod) {
			memcpy(&rsp, pvring_slot(&info->tx, info->tx.rsp_cons),
			       sizeof(rsp));
			info->tx.rsp_cons++;
			if (rsp.id >= PVNET_TX_SLOTS ||
			    !info->tx_in_flight[rsp.id]) {
				ok = false;
				goto out;
			}
			info->tx_in_flight[rsp.id] = false;
			info->tx_free[info->tx_nr_free++] = rsp.id;
			if (rsp.status != SV_NETIF_RSP_OKAY &&
			    rsp.status != SV_NETIF_RSP_NULL)
				info->tx_errors++;
		}
	} while (pvring_final_check(&info->tx));
	if (info->connected && netif_queue_stopped(info->netdev) &&
	    info->tx_nr_free >= info->tx_max_slots)
		netif_wake_queue(info->netdev);
out:
	spin_unlock_irqrestore(&info->tx_lock, flags);
	if (!ok)
		netdev_warn_once(info->netdev, "bad TX response from the back end\n");
	return ok;
}

/* ---- RX ---- */

static void pvnet_rx_post(struct pvnet_info *info)
{
	u32 slot = info->rx.req_prod_pvt & (info->rx.size - 1);
	struct sv_netif_rx_request req = {
		.id = slot,
		.gref = info->rx_bufs[slot].ref,
	};

	memcpy(pvring_next_request(&info->rx), &req, sizeof(req));
}

/*
 * Copies the chain of responses starting at rx.rsp_cons (up to @prod) into
 * @chain, each slot once: returns its length in slots, 0 if it is not
 * fully published yet, or -EIO if it breaks the protocol.  Data responses
 * must carry their own slot as id (buffer i is posted in slot i and the
 * back end answers in order); extra-info slots follow the first data slot.
 */
static int pvnet_rx_chain(struct pvnet_info *info, u32 prod,
			  union pvnet_rx_slot *chain)
{
	u32 idx = info->rx.rsp_cons;
	bool more = true, extras = false;
	int n = 0;

	while (more || extras) {
		if (idx == prod)
			return 0;
		if (n == PVNET_RX_MAX_CHAIN)
			return -EIO;
		memcpy(&chain[n], pvring_slot(&info->rx, idx), sizeof(chain[n]));
		if (extras) {
			extras = chain[n].extra.flags & SV_NETIF_EXTRA_FLAG_MORE;
		} else {
			if (chain[n].rsp.id != (idx & (info->rx.size - 1)))
				return -EIO;
			more = chain[n].rsp.flags & SV_NETRXF_more_data;
			extras = n == 0 &&
				 (chain[n].rsp.flags & SV_NETRXF_extra_info);
		}
		n++;
		idx++;
	}
	return n;
}

/* Builds the skb of the @n-slot @chain at rx.rsp_cons; NULL: drop it. */
static struct sk_buff *pvnet_rx_build(struct pvnet_info *info,
				      const union pvnet_rx_slot *chain, int n)
{
	struct sk_buff *skb = NULL;
	bool extras = false;
	int i;

	for (i = 0; i < n; i++) {
		const struct sv_netif_rx_response *rsp = &chain[i].rsp;
		u32 slot = (info->rx.rsp_cons + i) & (info->rx.size - 1);
		struct page *page;
		const u8 *data;

		if (extras) {
			/* GSO and multicast extras are not negotiated: skip. */
			extras = chain[i].extra.flags & SV_NETIF_EXTRA_FLAG_MORE;
			continue;
		}
		extras = i == 0 && (rsp->flags & SV_NETRXF_extra_info);
		if (rsp->status <= 0 || rsp->offset + rsp->status > PAGE_SIZE)
			goto err;
		data = page_address(info->rx_bufs[slot].page) + rsp->offset;
		if (!skb) {
			skb = napi_alloc_skb(&info->napi, rsp->status);
			if (!skb)
				goto nomem;
			skb_put_data(skb, data, rsp->status);
			continue;
		}
		if (skb_shinfo(skb)->nr_frags >= MAX_SKB_FRAGS)
			goto err;
		page = alloc_page(GFP_ATOMIC);
		if (!page)
			goto nomem;
		memcpy(page_address(page), data, rsp->status);
		skb_add_rx_frag(skb, skb_shinfo(skb)->nr_frags, page, 0,
				rsp->status, PAGE_SIZE);
	}
	/* eth_type_trans() reads the Ethernet header from the linear part. */
	if (!skb || !pskb_may_pull(skb, ETH_HLEN))
		goto err;
	return skb;
err:
	info->rx_errors++;
	dev_kfree_skb_any(skb);
	return NULL;
nomem:
	info->rx_dropped++;
	dev_kfree_skb_any(skb);
	return NULL;
}

static void pvnet_rx_deliver(struct pvnet_info *info, struct sk_buff *skb,
			     u16 flags)
{
	struct net_device *dev = info->netdev;

	skb->protocol = eth_type_trans(skb, dev);
	if (flags & SV_NETRXF_csum_blank) {
		skb->ip_summed = CHECKSUM_PARTIAL;
		if (skb_checksum_setup(skb, false)) {
			info->rx_errors++;
			dev_kfree_skb_any(skb);
			return;
		}
	} else if ((flags & SV_NETRXF_data_validated) &&
		   (dev->features & NETIF_F_RXCSUM)) {
		skb->ip_summed = CHECKSUM_UNNECESSARY;
	}
	info->rx_packets++;
	info->rx_bytes += skb->len;
	napi_gro_receive(&info->napi, skb);
}

/* Receives up to @budget frames; < 0 if the back end broke the protocol. */
static int pvnet_rx(struct pvnet_info *info, int budget)
{
	union pvnet_rx_slot chain[PVNET_RX_MAX_CHAIN];
	struct sk_buff *skb;
	int done = 0, n, i;
	bool notify;
	u32 prod;

	info->rx_waiting = false;
	while (done < budget) {
		if (pvring_rsp_prod(&info->rx, &prod))
			return -EIO;
		if (info->rx.rsp_cons == prod)
			break;
		n = pvnet_rx_chain(info, prod, chain);
		if (n < 0)
			return n;
		if (!n) {
			/* Wait for the rest of the frame. */
			info->rx_waiting = true;
			info->rx_seen = prod;
			break;
		}
		skb = pvnet_rx_build(info, chain, n);
		/* The data is copied out: give the pages back to the ring. */
		info->rx.rsp_cons += n;
		for (i = 0; i < n; i++)
			pvnet_rx_post(info);
		if (skb)
			pvnet_rx_deliver(info, skb, chain[0].rsp.flags);
		done++;
	}
	/* Our reads of the pages are done before they are posted again. */
	virt_mb();
	notify = pvring_push_requests(&info->rx);
	if (notify)
		pvbus_evtchn_notify(info->evtchn);
	return done;
}

/* Going idle on RX; true if there is more to do. */
static bool pvnet_rx_final_check(struct pvnet_info *info)
{
	struct sv_sring_header *s = info->rx.sring;

	if (!info->rx_waiting)
		return pvring_final_check(&info->rx);
	/* Half a frame is in: wake us when the back end publishes more. */
	WRITE_ONCE(s->rsp_event, info->rx_seen + 1);
	virt_mb();
	return READ_ONCE(s->rsp_prod) != info->rx_seen;
}

static int pvnet_poll(struct napi_struct *napi, int budget)
{
	struct pvnet_info *info = container_of(napi, struct pvnet_info, napi);
	int done;

	if (!READ_ONCE(info->connected) || READ_ONCE(info->broken)) {
		napi_complete_done(napi, 0);
		return 0;
	}
	if (!pvnet_tx_gc(info))
		goto broken;
	done = pvnet_rx(info, budget);
	if (done < 0)
		goto broken;
	if (done < budget && napi_complete_done(napi, done) &&
	    pvnet_rx_final_check(info))
		napi_schedule(napi);
	return done;

broken:
	WRITE_ONCE(info->broken, true);
	netdev_warn_once(info->netdev, "back end broke the ring protocol\n");
	schedule_work(&info->fatal_work);
	napi_complete_done(napi, 0);
	return 0;
}

static void pvnet_interrupt(unsigned int port, void *data)
{
	struct pvnet_info *info = data;

	/* A no-op while NAPI is disabled (interface down). */
	napi_schedule(&info->napi);
}

static void pvnet_fatal_work(struct work_struct *work)
{
	struct pvnet_info *info = container_of(work, struct pvnet_info,
					       fatal_work);

	netif_carrier_off(info->netdev);
	/* The handshake state is the mutex's: no racing a state change. */
	mutex_lock(&info->mutex);
	pvbus_dev_fatal(info->pdev, -EIO, "back end broke the ring protocol");
	mutex_unlock(&info->mutex);
}

/* ---- netdev ---- */

static int pvnet_open(struct net_device *dev)
{
	struct pvnet_info *info = netdev_priv(dev);

	napi_enable(&info->napi);
	netif_start_queue(dev);
	/* Pick up whatever arrived while we were down. */
	napi_schedule(&info->napi);
	return 0;
}

static int pvnet_close(struct net_device *dev)
{
	struct pvnet_info *info = netdev_priv(dev);

	netif_tx_disable(dev);
	napi_disable(&info->napi);
	return 0;
}

static void pvnet_get_stats64(struct net_device *dev,
			      struct rtnl_link_stats64 *stats)
{
	struct pvnet_info *info = netdev_priv(dev);

	/* 64-bit loads are atomic on x86-64: each counter is consistent. */
	stats->tx_packets = READ_ONCE(info->tx_packets);
	stats->tx_bytes = READ_ONCE(info->tx_bytes);
	stats->tx_errors = READ_ONCE(info->tx_errors);
	stats->tx_dropped = atomic_long_read(&info->tx_dropped);
	stats->rx_packets = READ_ONCE(info->rx_packets);
	stats->rx_bytes = READ_ONCE(info->rx_bytes);
	stats->rx_errors = READ_ONCE(info->rx_errors);
	stats->rx_dropped = READ_ONCE(info->rx_dropped);
}

static const struct net_device_ops pvnet_netdev_ops = {
	.ndo_open = pvnet_open,
	.ndo_stop = pvnet_close,
	.ndo_start_xmit = pvnet_start_xmit,
	.ndo_get_stats64 = pvnet_get_stats64,
	.ndo_validate_addr = eth_validate_addr,
};

/* ---- setup and teardown ---- */

static void pvnet_free_rings(struct pvnet_info *info)
{
	unsigned int i;

	if (info->evtchn_bound)
		pvbus_evtchn_unbind(info->evtchn);
	info->evtchn_bound = false;
	if (info->evtchn_allocated)
		pvbus_evtchn_close(info->evtchn);
	info->evtchn_allocated = false;
	for (i = 0; i < PVNET_TX_SLOTS; i++) {
		pvnet_ungrant_page(&info->tx_bufs[i]);
		info->tx_in_flight[i] = false;
	}
	for (i = 0; i < PVNET_RX_SLOTS; i++)
		pvnet_ungrant_page(&info->rx_bufs[i]);
	pvnet_ungrant_page(&info->tx_ring);
	pvnet_ungrant_page(&info->rx_ring);
	info->rings = false;
}

static int pvnet_alloc_rings(struct pvnet_info *info)
{
	pvbus_domid_t be = info->pdev->otherend_id;
	unsigned int i;
	int ret;

	ret = pvnet_grant_page(&info->tx_ring, be, false);
	if (!ret)
		ret = pvnet_grant_page(&info->rx_ring, be, false);
	if (ret)
		return ret;
	pvring_init(&info->tx, page_address(info->tx_ring.page), 1,
		    SV_NETIF_TX_SLOT_SIZE);
	pvring_init(&info->rx, page_address(info->rx_ring.page), 1,
		    SV_NETIF_RX_SLOT_SIZE);
	if (WARN_ON(info->tx.size != PVNET_TX_SLOTS ||
		    info->rx.size != PVNET_RX_SLOTS))
		return -EINVAL;

	info->tx_nr_free = 0;
	for (i = 0; i < PVNET_TX_SLOTS; i++) {
		/* The back end only reads what we send. */
		ret = pvnet_grant_page(&info->tx_bufs[i], be, true);
		if (ret)
			return ret;
		info->tx_in_flight[i] = false;
		info->tx_free[info->tx_nr_free++] = PVNET_TX_SLOTS - 1 - i;
	}
	for (i = 0; i < PVNET_RX_SLOTS; i++) {
		ret = pvnet_grant_page(&info->rx_bufs[i], be, false);
		if (ret)
			return ret;
	}
	/* Every RX buffer goes on the ring at once. */
	for (i = 0; i < PVNET_RX_SLOTS; i++)
		pvnet_rx_post(info);
	pvring_push_requests(&info->rx);
	info->rx_waiting = false;

	ret = pvbus_evtchn_alloc_unbound(be, &info->evtchn);
	if (ret)
		return ret;
	info->evtchn_allocated = true;
	ret = pvbus_evtchn_bind(info->evtchn, pvnet_interrupt, info,
				dev_name(&info->pdev->dev));
	if (ret)
		return ret;
	info->evtchn_bound = true;
	info->rings = true;
	return 0;
}

static int pvnet_publish(struct pvnet_info *info)
{
	const char *node = info->pdev->nodename;
	pvbus_xs_tx_t tx;
	int ret;

again:
	ret = pvbus_xs_transaction_start(&tx);
	if (ret)
		return ret;
	ret = pvbus_xs_printf(tx, node, SV_NETIF_KEY_TX_RING_REF, "%u",
			      info->tx_ring.ref);
	if (!ret)
		ret = pvbus_xs_printf(tx, node, SV_NETIF_KEY_RX_RING_REF, "%u",
				      info->rx_ring.ref);
	if (!ret)
		ret = pvbus_xs_printf(tx, node, SV_NETIF_KEY_EVENT_CHANNEL,
				      "%u", info->evtchn);
	if (!ret)
		ret = pvbus_xs_write(tx, node, SV_NETIF_KEY_REQUEST_RX_COPY, "1");
	/* We take frames spread over several RX slots. */
	if (!ret)
		ret = pvbus_xs_write(tx, node, SV_NETIF_KEY_FEATURE_SG, "1");
	/* Our buffer grants stay put: the back end may keep them mapped. */
	if (!ret)
		ret = pvbus_xs_write(tx, node, SV_BLKIF_KEY_FEATURE_PERSISTENT,
				     "1");
	if (ret) {
		pvbus_xs_transaction_end(tx, true);
		return ret;
	}
	ret = pvbus_xs_transaction_end(tx, false);
	if (ret == -EAGAIN)
		goto again;
	return ret;
}

/* The MAC the toolstack chose: our directory first, then the back end's. */
static void pvnet_read_mac(struct pvnet_info *info, u8 *mac)
{
	const char *dirs[] = { info->pdev->nodename, info->pdev->otherend };
	unsigned int i;
	char *s;

	for (i = 0; i < ARRAY_SIZE(dirs); i++) {
		s = pvbus_xs_read(PVBUS_XS_NO_TX, dirs[i], SV_NETIF_KEY_MAC,
				  NULL);
		if (IS_ERR(s))
			continue;
		if (mac_pton(strim(s), mac) && is_valid_ether_addr(mac)) {
			kfree(s);
			return;
		}
		kfree(s);
	}
	dev_warn(&info->pdev->dev, "no valid MAC in the store: using a random one\n");
	eth_random_addr(mac);
}

static int pvnet_register(struct pvnet_info *info)
{
	struct net_device *dev = info->netdev;
	u8 mac[ETH_ALEN];
	int ret;

	pvnet_read_mac(info, mac);
	eth_hw_addr_set(dev, mac);
	dev->min_mtu = ETH_MIN_MTU;
	dev->max_mtu = info->sg ? SV_NETIF_MAX_FRAME_SIZE - ETH_HLEN :
				  ETH_DATA_LEN;
	dev->hw_features = NETIF_F_IP_CSUM | NETIF_F_RXCSUM |
			   (info->sg ? NETIF_F_SG : 0);
	dev->features = dev->hw_features;
	netif_carrier_off(dev);
	ret = register_netdev(dev);
	if (ret)
		return ret;
	info->registered = true;
	netdev_info(dev, "%pM, %s\n", dev->dev_addr,
		    info->sg ? "scatter-gather" : "single-slot frames");
	return 0;
}

/* Back end in InitWait: build the rings, publish them, register. */
static int pvnet_setup(struct pvnet_info *info)
{
	const char *be = info->pdev->otherend;
	int ret;

	if (!pvbus_xs_read_uint_default(be, SV_NETIF_KEY_FEATURE_RX_COPY, 0)) {
		dev_err(&info->pdev->dev, "back end cannot copy RX frames\n");
		return -EOPNOTSUPP;
	}
	/* Fixed once the netdev exists (MTU and features depend on it). */
	if (!info->registered) {
		info->sg = pvbus_xs_read_uint_default(be, SV_NETIF_KEY_FEATURE_SG,
						      0);
		info->tx_max_slots = info->sg ? SV_NETIF_MAX_SLOTS_PER_FRAME : 1;
	}
	info->broken = false;
	ret = pvnet_alloc_rings(info);
	if (!ret)
		ret = pvnet_publish(info);
	if (!ret && !info->registered)
		ret = pvnet_register(info);
	if (ret)
		pvnet_free_rings(info);
	return ret;
}

/* Back end Connected: let traffic flow. */
static void pvnet_connect(struct pvnet_info *info)
{
	unsigned long flags;

	spin_lock_irqsave(&info->tx_lock, flags);
	info->connected = true;
	spin_unlock_irqrestore(&info->tx_lock, flags);
	rtnl_lock();
	netif_carrier_on(info->netdev);
	if (netif_running(info->netdev)) {
		netif_wake_queue(info->netdev);
		napi_schedule(&info->napi);
	}
	rtnl_unlock();
}

/* Undoes setup and connect, whichever happened; the caller holds mutex. */
static void pvnet_teardown(struct pvnet_info *info)
{
	struct net_device *dev = info->netdev;
	unsigned long flags;
	bool running;

	if (!info->rings)
		return;
	spin_lock_irqsave(&info->tx_lock, flags);
	info->connected = false;
	spin_unlock_irqrestore(&info->tx_lock, flags);

	rtnl_lock();
	netif_carrier_off(dev);
	/* Waits for a transmit in progress: none touches the rings after. */
	netif_tx_disable(dev);
	/* Waits for a poll in progress (NAPI is off while the device is down). */
	running = netif_running(dev);
	if (running)
		napi_disable(&info->napi);
	pvnet_free_rings(info);
	if (running)
		napi_enable(&info->napi);
	rtnl_unlock();
}

static void pvnet_backend_changed(struct pvbus_device *pdev,
				  enum pvbus_state backend)
{
	struct pvnet_info *info = dev_get_drvdata(&pdev->dev);
	int ret;

	mutex_lock(&info->mutex);
	switch (backend) {
	case PVBUS_STATE_INIT_WAIT:
		if (pdev->state != PVBUS_STATE_INITIALISING &&
		    pdev->state != PVBUS_STATE_CLOSED)
			break;
		ret = pvnet_setup(info);
		if (ret) {
			pvbus_dev_fatal(pdev, ret, "setting up the rings");
			break;
		}
		pvbus_switch_state(pdev, PVBUS_STATE_INITIALISED);
		break;
	case PVBUS_STATE_CONNECTED:
		if (pdev->state != PVBUS_STATE_INITIALISED)
			break;
		pvnet_connect(info);
		pvbus_switch_state(pdev, PVBUS_STATE_CONNECTED);
		break;
	case PVBUS_STATE_CLOSING:
	case PVBUS_STATE_CLOSED:
		if (pdev->state == PVBUS_STATE_CLOSED)
			break;
		pvnet_teardown(info);
		pvbus_switch_state(pdev, PVBUS_STATE_CLOSED);
		break;
	default:
		break;
	}
	mutex_unlock(&info->mutex);
}

static int pvnet_probe(struct pvbus_device *pdev)
{
	struct net_device *dev;
	struct pvnet_info *info;

	dev = alloc_etherdev(sizeof(*info));
	if (!dev)
		return -ENOMEM;
	SET_NETDEV_DEV(dev, &pdev->dev);
	dev->netdev_ops = &pvnet_netdev_ops;
	info = netdev_priv(dev);
	info->netdev = dev;
	info->pdev = pdev;
	mutex_init(&info->mutex);
	spin_lock_init(&info->tx_lock);
	atomic_long_set(&info->tx_dropped, 0);
	INIT_WORK(&info->fatal_work, pvnet_fatal_work);
	netif_napi_add(dev, &info->napi, pvnet_poll);
	dev_set_drvdata(&pdev->dev, info);
	return 0;
}

static void pvnet_remove(struct pvbus_device *pdev)
{
	struct pvnet_info *info = dev_get_drvdata(&pdev->dev);
	struct net_device *dev = info->netdev;

	mutex_lock(&info->mutex);
	pvnet_teardown(info);
	mutex_unlock(&info->mutex);
	/* The handler is unbound: nothing queues the work any more. */
	cancel_work_sync(&info->fatal_work);
	if (info->registered)
		unregister_netdev(dev);
	netif_napi_del(&info->napi);
	dev_set_drvdata(&pdev->dev, NULL);
	free_netdev(dev);
}

static struct pvbus_driver pvnet_driver = {
	.devicetype = "vif",
	.probe = pvnet_probe,
	.otherend_changed = pvnet_backend_changed,
	.remove = pvnet_remove,
};

static int __init pvnet_init(void)
{
	return pvbus_register_driver(&pvnet_driver);
}

static void __exit pvnet_exit(void)
{
	pvbus_unregister_driver(&pvnet_driver);
}

module_init(pvnet_init);
module_exit(pvnet_exit);

MODULE_DESCRIPTION("Splitvisor network front end (NAPI over netif rings)");
MODULE_AUTHOR("The Splitvisor authors");
MODULE_LICENSE("Dual BSD/GPL");
MODULE_ALIAS("splitvisor:vif");
