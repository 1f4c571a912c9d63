// RDMA transports over libibverbs, loaded with dlopen at run time (pe_verbs_abi.h declares the ABI
// used): `verbs` (InfiniBand / RoCE, reliable connected queue pairs) and `efa` (AWS EFA, SRD queue
// pairs through libefa). Where the libraries or a device are missing, create() and pe_verbs_probe()
// say which.
//
// verbs (RC). One RC QP per rank of the job (options rank=R,world=N), all on one CQ and one shared
// receive queue. The address blob carries the port's LID and GID, the MTU, the start PSN, this
// process's rank and the QP number it dedicates to each rank (3 bytes each, so world <= 325 with
// 1 KiB blobs); connect() moves the QP dedicated to the peer's rank to RTS toward the peer's QP
// dedicated to ours. A put is cut into RDMA writes of at most `fragment` bytes (default 1 MiB); a
// put-with-signal's last write is an RDMA write with immediate carrying SIGNAL(counter, seq, value)
// (pe_msgproto.h), a signal alone a zero-byte one. The receiving proxy applies the signal when the
// immediate's completion arrives: RC places the writes of a QP in order, so every byte of the put
// has landed by then (pe_msgproto's table still checks the sequence). Regions are registered
// memory regions (local and remote write); their key blobs carry address and rkey.
//
// efa (SRD). One SRD QP (efadv_create_driver_qp), address handles per peer. SRD is reliable but
// unordered, and RDMA write is missing on older EFA devices, so puts travel as two-sided SENDs of
// pe_msgproto messages (header + fragment, copied through registered bounce buffers) that the
// receiver copies into the window; signals wait, by byte counting, for their bytes. Fragments are
// bounded by the port's message size (about one 8 KiB MTU). Messages to itself are delivered in
// place (whether a device loops SRD back to its own QP is not guaranteed). The QP asks the device
// to retry while the receiver has no receive posted (RNR retry) where the device supports it;
// without that capability a receiver more than recv_depth messages behind loses messages, whose
// counters then stay short (the caller's deadline names the peer).
//
// Both: posts wait in a per-peer queue (bounded in posts and bytes: PE_BUSY beyond) until the
// send queue has room; every work request is signalled, so pending() counts what the device still
// owns. A failed work completion fails that peer only. Options: rank, world, device (or
// PORTEP_IB_DEVICE), port (or PORTEP_IB_PORT, default 1), gid_index (or PORTEP_IB_GID_INDEX;
// default: 0 on InfiniBand and EFA, the first RoCE v2 IPv4 GID on Ethernet), fragment,
// sq_depth, recv_depth, queue_posts, queue_bytes.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pe_msgproto.h"
#include "pe_transport.h"
#include "pe_verbs_abi.h"

#define VB_MAGIC "PEVB"
#define VB_VERSION 1
#define VB_KIND_RC 1
#define VB_KIND_SRD 2
#define VB_QPN_BYTES 3
#define AMAZON_VENDOR_ID 0x1d0fu
#define SRD_QKEY 0x11111111u
#define RECV_WR (1ull << 63)  // wr_id bit of receive work requests
#define CQ_BATCH 32
#define CQ_MAX_PER_PROGRESS 4096
#define RC_DEFAULT_FRAGMENT (1u << 20)
#define RC_SQ_DEPTH 128u
#define RC_SRQ_DEPTH 1024u
#define SRD_SQ_DEPTH 256u
#define SRD_RQ_DEPTH 1024u
#define SRD_PEER_INFLIGHT 64u  // sends in flight toward one peer (the bounce buffers are shared)
#define VB_QUEUE_POSTS 1024u
#define VB_QUEUE_BYTES (64ull << 20)

// The address blob: this header, then 3 bytes per QP number.
typedef struct vb_address {
  char magic[4];
  uint8_t version;
  uint8_t kind;
  uint16_t lid;
  uint8_t gid[16];
  uint32_t psn;       // RC: start packet sequence number; SRD: qkey
  int32_t rank;
  uint32_t nqpn;      // RC: world; SRD: 1
  uint32_t mtu;       // RC: enum ibv_mtu of the port; SRD: bytes of each receive buffer
  uint64_t id;        // the instance (SRD messages name their source with it)
  uint8_t qpn[];
} vb_address_t;

_Static_assert(sizeof(vb_address_t) == 48, "vb_address_t head is 48 bytes");
#define VB_MAX_WORLD ((PE_BLOB_MAX - sizeof(vb_address_t)) / VB_QPN_BYTES)

// ------------------------------------------------------------------------------ library loading
static pe_ibv_api_t ibv;
static int ibv_state, efa_state;  // 0 untried, 1 loaded, -1 missing
static char ibv_error[PE_ERR_LEN], efa_error[PE_ERR_LEN];
static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;

#define RESOLVE(handle, field, symbol, out)                                                    \
  do {                                                                                         \
    *(void **)&ibv.field = dlsym(handle, symbol);                                              \
    if (ibv.field == NULL && !(out)[0])                                                        \
      snprintf(out, PE_ERR_LEN, "%s lacks %s (rdma-core too old?)", #handle, symbol);          \
  } while (0)

static void load_ibverbs(void) {
  void *libibverbs = dlopen("libibverbs.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (libibverbs == NULL) {
    snprintf(ibv_error, PE_ERR_LEN, "libibverbs.so.1 is not installed (%s); install rdma-core's libibverbs "
             "(Debian/Ubuntu: libibverbs1 ibverbs-providers; RHEL: libibverbs)", dlerror());
    ibv_state = -1;
    return;
  }
  RESOLVE(libibverbs, get_device_list, "ibv_get_device_list", ibv_error);
  RESOLVE(libibverbs, free_device_list, "ibv_free_device_list", ibv_error);
  RESOLVE(libibverbs, get_device_name, "ibv_get_device_name", ibv_error);
  RESOLVE(libibverbs, open_device, "ibv_open_device", ibv_error);
  RESOLVE(libibverbs, close_device, "ibv_close_device", ibv_error);
  RESOLVE(libibverbs, query_device, "ibv_query_device", ibv_error);
  RESOLVE(libibverbs, query_port, "ibv_query_port", ibv_error);
  RESOLVE(libibverbs, query_gid, "ibv_query_gid", ibv_error);
  RESOLVE(libibverbs, alloc_pd, "ibv_alloc_pd", ibv_error);
  RESOLVE(libibverbs, dealloc_pd, "ibv_dealloc_pd", ibv_error);
  RESOLVE(libibverbs, reg_mr, "ibv_reg_mr", ibv_error);
  RESOLVE(libibverbs, dereg_mr, "ibv_dereg_mr", ibv_error);
  RESOLVE(libibverbs, create_comp_channel, "ibv_create_comp_channel", ibv_error);
  RESOLVE(libibverbs, destroy_comp_channel, "ibv_destroy_comp_channel", ibv_error);
  RESOLVE(libibverbs, create_cq, "ibv_create_cq", ibv_error);
  RESOLVE(libibverbs, destroy_cq, "ibv_destroy_cq", ibv_error);
  RESOLVE(libibverbs, get_cq_event, "ibv_get_cq_event", ibv_error);
  RESOLVE(libibverbs, ack_cq_events, "ibv_ack_cq_events", ibv_error);
  RESOLVE(libibverbs, create_srq, "ibv_create_srq", ibv_error);
  RESOLVE(libibverbs, destroy_srq, "ibv_destroy_srq", ibv_error);
  RESOLVE(libibverbs, create_qp, "ibv_create_qp", ibv_error);
  RESOLVE(libibverbs, modify_qp, "ibv_modify_qp", ibv_error);
  RESOLVE(libibverbs, destroy_qp, "ibv_destroy_qp", ibv_error);
  RESOLVE(libibverbs, create_ah, "ibv_create_ah", ibv_error);
  RESOLVE(libibverbs, destroy_ah, "ibv_destroy_ah", ibv_error);
  RESOLVE(libibverbs, wc_status_str, "ibv_wc_status_str", ibv_error);
  ibv_state = ibv_error[0] ? -1 : 1;  // the library stays loaded: its providers may keep threads
}

static void load_efa(void) {
  void *libefa = dlopen("libefa.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (libefa == NULL) {
    snprintf(efa_error, PE_ERR_LEN, "libefa.so.1 is not installed (%s); install rdma-core's EFA provider "
             "(the AWS EFA installer, or Debian/Ubuntu: ibverbs-providers)", dlerror());
    efa_state = -1;
    return;
  }
  RESOLVE(libefa, efadv_query_device, "efadv_query_device", efa_error);
  RESOLVE(libefa, efadv_create_driver_qp, "efadv_create_driver_qp", efa_error);
  efa_state = efa_error[0] ? -1 : 1;
}

// 0 once libibverbs (and libefa for EFA) are loaded; -1 with the reason.
static int load_libraries(int efa, char *err) {
  pthread_mutex_lock(&load_lock);
  if (ibv_state == 0) load_ibverbs();
  if (efa && ibv_state > 0 && efa_state == 0) load_efa();
  int rc = ibv_state < 0 ? -1 : (efa && efa_state < 0) ? -1 : 0;
  if (rc != 0) pe_err(err, "%s", ibv_state < 0 ? ibv_error : efa_error);
  pthread_mutex_unlock(&load_lock);
  return rc;
}

// ------------------------------------------------------------------------------------- devices
// Callers name the transport in front of a create() error (portep.native.engine does): drop ours.
static void drop_prefix(char *err, const char *who) {
  const size_t n = strlen(who);
  if (err != NULL && strncmp(err, who, n) == 0 && err[n] == ':' && err[n + 1] == ' ')
    memmove(err, err + n + 2, strlen(err + n + 2) + 1);
}

typedef struct vb_dev {
  struct ibv_context *ctx;
  struct ibv_pd *pd;
  struct ibv_comp_channel *channel;
  struct ibv_cq *cq;
  struct ibv_device_attr dattr;
  struct ibv_port_attr pattr;
  struct efadv_device_attr efa;
  uint8_t port;
  int gid_index;
  union ibv_gid gid;
  char name[64];
  unsigned int events;  // completion events not acknowledged yet
} vb_dev_t;

static const char *port_state_name(int state) {
  static const char *names[] = {"NOP", "DOWN", "INIT", "ARMED", "ACTIVE", "ACTIVE_DEFER"};
  return state >= 0 && state < 6 ? names[state] : "unknown";
}

static int is_efa_device(struct ibv_context *ctx, const struct ibv_device_attr *attr, struct efadv_device_attr *efa) {
  memset(efa, 0, sizeof *efa);
  if (efa_state > 0 && ibv.efadv_query_device(ctx, efa, sizeof *efa) == 0) return 1;
  return attr->vendor_id == AMAZON_VENDOR_ID;
}

static void gid_type(const char *dev, int port, int index, char *out, size_t cap) {
  char path[256];
  out[0] = '\0';
  snprintf(path, sizeof path, "/sys/class/infiniband/%s/ports/%d/gid_attrs/types/%d", dev, port, index);
  FILE *f = fopen(path, "r");
  if (f == NULL) return;
  if (fgets(out, (int)cap, f) == NULL) out[0] = '\0';
  fclose(f);
}

// The GID index to use on an Ethernet (RoCE) port: the first RoCE v2 GID with an IPv4-mapped address,
// else the first RoCE v2 one, else the first non-zero one.
static int pick_roce_gid(vb_dev_t *d) {
  int best = -1, best_score = 0;
  for (int i = 0; i < d->pattr.gid_tbl_len && i < 256; ++i) {
    union ibv_gid g;
    if (ibv.query_gid(d->ctx, d->port, i, &g) != 0) continue;
    int zero = 1;
    for (int k = 0; k < 16; ++k) zero &= g.raw[k] == 0;
    if (zero) continue;
    char type[32];
    gid_type(d->name, d->port, i, type, sizeof type);
    const int v2 = strstr(type, "v2") != NULL;
    int ipv4 = 1;
    for (int k = 0; k < 10; ++k) ipv4 &= g.raw[k] == 0;
    ipv4 &= g.raw[10] == 0xff && g.raw[11] == 0xff;
    const int score = v2 && ipv4 ? 3 : v2 ? 2 : 1;
    if (score > best_score) {
      best = i;
      best_score = score;
    }
  }
  return best;
}

static void close_device(vb_dev_t *d) {
  if (d->cq) {
    if (d->events) ibv.ack_cq_events(d->cq, d->events);
    ibv.destroy_cq(d->cq);
  }
  if (d->channel) ibv.destroy_comp_channel(d->channel);
  if (d->pd) ibv.dealloc_pd(d->pd);
  if (d->ctx) ibv.close_device(d->ctx);
  memset(d, 0, sizeof *d);
}

static const char *env_or(const char *options, const char *key, const char *env, char *buf, size_t cap) {
  if (pe_opt_get(options, key, buf, cap) && buf[0]) return buf;
  const char *v = getenv(env);
  if (v && v[0]) {
    snprintf(buf, cap, "%s", v);
    return buf;
  }
  return NULL;
}

// Open the device of the wanted kind (the first usable one, or `want`), check its port, choose the
// GID. 0, or -1 with `err` naming what is missing.
static int open_device(vb_dev_t *d, int efa, const char *want, int port, int gid_index, char *err) {
  memset(d, 0, sizeof *d);
  int n = 0;
  struct ibv_device **list = ibv.get_device_list(&n);
  if (list == NULL) {
    pe_err(err, "no RDMA device: libibverbs cannot list devices (%s)", strerror(errno));
    return -1;
  }
  if (n == 0) {
    ibv.free_device_list(list);
    pe_err(err, "no RDMA device: libibverbs finds none on this machine");
    return -1;
  }
  char seen[PE_ERR_LEN] = "";
  size_t used = 0;
  int found = 0;
  for (int i = 0; i < n && !found; ++i) {
    const char *name = ibv.get_device_name(list[i]);
    if (want && strcmp(want, name) != 0) continue;
    struct ibv_context *ctx = ibv.open_device(list[i]);
    const char *why = NULL;
    char detail[96] = "";
    struct ibv_device_attr dattr;
    struct ibv_port_attr pattr;
    struct efadv_device_attr eattr;
    memset(&pattr, 0, sizeof pattr);
    if (ctx == NULL) {
      why = "cannot be opened";
    } else if (ibv.query_device(ctx, &dattr) != 0) {
      why = "cannot be queried";
    } else if (is_efa_device(ctx, &dattr, &eattr) != efa) {
      why = efa ? "is not an EFA device" : "is an EFA device (use the efa transport)";
    } else if (port < 1 || port > dattr.phys_port_cnt || ibv.query_port(ctx, (uint8_t)port, &pattr) != 0) {
      snprintf(detail, sizeof detail, "has no port %d", port);
      why = detail;
    } else if (pattr.state != IBV_PORT_ACTIVE) {
      snprintf(detail, sizeof detail, "port %d is %s", port, port_state_name(pattr.state));
      why = detail;
    }
    if (why != NULL) {
      if (used < sizeof seen)
        used += (size_t)snprintf(seen + used, sizeof seen - used, "%s%s %s", used ? "; " : "", name, why);
      if (ctx) ibv.close_device(ctx);
      continue;
    }
    d->ctx = ctx;
    d->dattr = dattr;
    d->pattr = pattr;
    d->efa = eattr;
    d->port = (uint8_t)port;
    snprintf(d->name, sizeof d->name, "%s", name);
    found = 1;
  }
  ibv.free_device_list(list);
  if (!found) {
    if (want && !seen[0])
      pe_err(err, "RDMA device %s not found", want);
    else
      pe_err(err, "no usable %s device: %s", efa ? "EFA" : "InfiniBand/RoCE", seen);
    return -1;
  }
  if (gid_index < 0)
    gid_index = !efa && d->pattr.link_layer == IBV_LINK_LAYER_ETHERNET ? pick_roce_gid(d) : 0;
  if (gid_index < 0 || ibv.query_gid(d->ctx, d->port, gid_index, &d->gid) != 0) {
    pe_err(err, "%s port %d has no usable GID%s", d->name, port,
           d->pattr.link_layer == IBV_LINK_LAYER_ETHERNET ? " (is an IP address configured on it?)" : "");
    close_device(d);
    return -1;
  }
  d->gid_index = gid_index;
  return 0;
}

// The protection domain, completion channel (non-blocking) and a CQ of `cqe` entries.
static int open_cq(vb_dev_t *d, int cqe, const char *who, char *err) {
  d->pd = ibv.alloc_pd(d->ctx);
  d->channel = d->pd ? ibv.create_comp_channel(d->ctx) : NULL;
  if (d->channel) fcntl(d->channel->fd, F_SETFL, fcntl(d->channel->fd, F_GETFL) | O_NONBLOCK);
  if (cqe > d->dattr.max_cqe && d->dattr.max_cqe > 0) cqe = d->dattr.max_cqe;
  d->cq = d->channel ? ibv.create_cq(d->ctx, cqe, NULL, d->channel, 0) : NULL;
  if (d->cq == NULL) {
    pe_err(err, "%s: cannot allocate a protection domain, a completion channel and a %d-entry CQ on %s: %s", who,
           cqe, d->name, strerror(errno));
    return -1;
  }
  return 0;
}

static int option_int(const char *options, const char *key, const char *env, int fallback, const char *who,
                      int *out, char *err) {
  char text[64];
  *out = fallback;
  if (env_or(options, key, env, text, sizeof text) == NULL) return 0;
  char *end;
  long v = strtol(text, &end, 10);
  if (*end != '\0' || v < 0 || v > 65535) {
    pe_err(err, "%s: %s=%s is not a valid number", who, key, text);
    return -1;
  }
  *out = (int)v;
  return 0;
}

int pe_verbs_probe(int efa, char *err) {
  char local[PE_ERR_LEN] = "";
  if (err == NULL) err = local;
  if (load_libraries(efa, err) != 0) return 0;
  char want[64];
  int port;
  if (option_int(NULL, "port", "PORTEP_IB_PORT", 1, "probe", &port, err) != 0) return 0;
  vb_dev_t d;
  if (open_device(&d, efa, env_or(NULL, "device", "PORTEP_IB_DEVICE", want, sizeof want), port, -1, err) != 0)
    return 0;
  close_device(&d);
  return 1;
}

// ----------------------------------------------------------------------------------- instances
typedef struct vb_peer {
  int used;
  int rank;
  int failed, reported;
  uint64_t id;
  pe_msg_queue_t queue;
  uint32_t inflight;   // work requests posted and not completed
  uint64_t frag;       // largest payload per message toward it
  struct ibv_ah *ah;   // SRD
  uint32_t qpn;        // SRD: its QP
  int self;            // SRD: this instance (delivered here, without the device)
  char error[PE_ERR_LEN];
} vb_peer_t;

struct pe_transport {
  int efa;
  const char *who;
  vb_dev_t dev;
  int rank, world;
  uint64_t id;
  uint32_t psn;
  uint64_t frag, queue_posts, queue_bytes;
  uint32_t sq_depth, rq_depth;
  struct ibv_qp **qps;     // RC: the QP dedicated to each rank
  uint32_t *qpn_rank;      // RC: (qp_num, rank) pairs sorted by qp_num
  struct ibv_srq *srq;     // RC
  struct ibv_qp *qp;       // SRD
  uint32_t msg_bytes;      // SRD: bytes of each bounce buffer
  uint8_t *bufs;           // SRD: rq_depth receive buffers, then sq_depth send buffers, then one for itself
  struct ibv_mr *bufs_mr;
  uint32_t *free_bufs, nfree;
  vb_peer_t *peers;
  int num_peers;
  struct ibv_mr **mrs;     // RC: by local region id
  int num_mrs;
  pe_msg_remotes_t remotes;
  pe_msg_table_t *table;
  pe_msg_seqs_t *seqs;
  uint64_t inflight;
  int armed;
  pe_transport_stats_t stats;
};

static void peer_label(const pe_transport_t *t, int i, char *out, size_t cap) {
  if (t->peers[i].rank >= 0)
    snprintf(out, cap, "rank %d", t->peers[i].rank);
  else
    snprintf(out, cap, "peer %d", i);
}

static void peer_fail(pe_transport_t *t, int i, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void peer_fail(pe_transport_t *t, int i, const char *fmt, ...) {
  vb_peer_t *p = &t->peers[i];
  if (p->failed) return;
  char label[32], why[320];
  peer_label(t, i, label, sizeof label);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof why, fmt, ap);
  va_end(ap);
  snprintf(p->error, PE_ERR_LEN, "%s: %s on %s: %s", t->who, label, t->dev.name, why);
  p->failed = 1;
  pe_msg_queue_clear(&p->queue);
}

static void vb_destroy(pe_transport_t *t) {
  if (t->qps)
    for (int r = 0; r < t->world; ++r)
      if (t->qps[r]) ibv.destroy_qp(t->qps[r]);
  if (t->qp) ibv.destroy_qp(t->qp);
  if (t->srq) ibv.destroy_srq(t->srq);
  for (int i = 0; i < t->num_peers; ++i) {
    if (t->peers[i].ah) ibv.destroy_ah(t->peers[i].ah);
    pe_msg_queue_free(&t->peers[i].queue);
  }
  for (int i = 0; i < t->num_mrs; ++i)
    if (t->mrs[i]) ibv.dereg_mr(t->mrs[i]);
  if (t->bufs_mr) ibv.dereg_mr(t->bufs_mr);
  if (t->dev.ctx) close_device(&t->dev);
  free(t->qps);
  free(t->qpn_rank);
  free(t->bufs);
  free(t->free_bufs);
  free(t->peers);
  free(t->mrs);
  pe_msg_remotes_free(&t->remotes);
  pe_msg_table_destroy(t->table);
  pe_msg_seqs_destroy(t->seqs);
  free(t);
}

static int parse_common(pe_transport_t *t, const char *options, char *err) {
  uint64_t rank = UINT64_MAX, world = 0, posts = VB_QUEUE_POSTS, bytes = VB_QUEUE_BYTES;
  if (pe_opt_u64(options, "rank", &rank, t->who, err) < 0 || pe_opt_u64(options, "world", &world, t->who, err) < 0 ||
      pe_opt_u64(options, "fragment", &t->frag, t->who, err) < 0 ||
      pe_opt_u64(options, "queue_posts", &posts, t->who, err) < 0 ||
      pe_opt_u64(options, "queue_bytes", &bytes, t->who, err) < 0)
    return -1;
  if (rank != UINT64_MAX && (rank > INT32_MAX || (world && rank >= world))) {
    pe_err(err, "%s: rank=%llu is not a rank of world=%llu", t->who, (unsigned long long)rank,
           (unsigned long long)world);
    return -1;
  }
  if (posts == 0 || posts > (1u << 20) || bytes == 0) {
    pe_err(err, "%s: queue_posts must be in 1..%u and queue_bytes positive", t->who, 1u << 20);
    return -1;
  }
  t->rank = rank == UINT64_MAX ? -1 : (int)rank;
  t->world = (int)(world > INT32_MAX ? INT32_MAX : world);
  t->queue_posts = posts;
  t->queue_bytes = bytes;
  return 0;
}

static int depth_option(const char *options, const char *key, uint32_t fallback, uint32_t max, const char *who,
                        uint32_t *out, char *err) {
  uint64_t v = fallback;
  if (pe_opt_u64(options, key, &v, who, err) < 0) return -1;
  if (v == 0) {
    pe_err(err, "%s: %s must be positive", who, key);
    return -1;
  }
  *out = (uint32_t)(v < max ? v : max);
  return 0;
}

static int qpn_cmp(const void *a, const void *b) {
  const uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

static int rank_of_qpn(const pe_transport_t *t, uint32_t qpn) {
  const uint32_t *hit = bsearch(&qpn, t->qpn_rank, (size_t)t->world, 2 * sizeof(uint32_t), qpn_cmp);
  return hit ? (int)hit[1] : -1;
}

static int modify(pe_transport_t *t, struct ibv_qp *qp, struct ibv_qp_attr *attr, int mask, const char *step,
                  char *err) {
  int rc = ibv.modify_qp(qp, attr, mask);
  if (rc != 0) {
    pe_err(err, "%s: moving a queue pair on %s to %s failed: %s", t->who, t->dev.name, step, strerror(rc));
    return -1;
  }
  return 0;
}

static int post_srq_receive(pe_transport_t *t, uint64_t index) {
  struct ibv_recv_wr wr = {.wr_id = RECV_WR | index, .num_sge = 0}, *bad = NULL;
  return pe_ibv_post_srq_recv(t->srq, &wr, &bad);
}

static int post_srd_receive(pe_transport_t *t, uint32_t index) {
  struct ibv_sge sge = {.addr = (uint64_t)(uintptr_t)(t->bufs + (size_t)index * t->msg_bytes),
                        .length = t->msg_bytes, .lkey = t->bufs_mr->lkey};
  struct ibv_recv_wr wr = {.wr_id = RECV_WR | index, .sg_list = &sge, .num_sge = 1}, *bad = NULL;
  return pe_ibv_post_recv(t->qp, &wr, &bad);
}

static int create_rc(pe_transport_t *t, const char *options, char *err) {
  if (depth_option(options, "sq_depth", RC_SQ_DEPTH, 1u << 14, t->who, &t->sq_depth, err) < 0 ||
      depth_option(options, "recv_depth", RC_SRQ_DEPTH, 1u << 16, t->who, &t->rq_depth, err) < 0)
    return -1;
  if (t->frag == 0) t->frag = RC_DEFAULT_FRAGMENT;
  if (t->frag > t->dev.pattr.max_msg_sz && t->dev.pattr.max_msg_sz) t->frag = t->dev.pattr.max_msg_sz;
  if (t->frag > PE_MSG_MAX_FRAGMENT) t->frag = PE_MSG_MAX_FRAGMENT;
  if ((int)t->sq_depth > t->dev.dattr.max_qp_wr) t->sq_depth = (uint32_t)t->dev.dattr.max_qp_wr;
  if ((int)t->rq_depth > t->dev.dattr.max_srq_wr) t->rq_depth = (uint32_t)t->dev.dattr.max_srq_wr;
  if (open_cq(&t->dev, (int)(t->sq_depth * (uint64_t)t->world + t->rq_depth), t->who, err) != 0) return -1;
  struct ibv_srq_init_attr sattr = {.attr = {.max_wr = t->rq_depth, .max_sge = 1}};
  t->srq = ibv.create_srq(t->dev.pd, &sattr);
  if (t->srq == NULL) {
    pe_err(err, "%s: cannot create a %u-entry shared receive queue on %s: %s", t->who, t->rq_depth, t->dev.name,
           strerror(errno));
    return -1;
  }
  t->qps = calloc((size_t)t->world, sizeof *t->qps);
  t->qpn_rank = calloc((size_t)t->world * 2, sizeof *t->qpn_rank);
  if (t->qps == NULL || t->qpn_rank == NULL) {
    pe_err(err, "%s: out of memory", t->who);
    return -1;
  }
  for (int r = 0; r < t->world; ++r) {
    struct ibv_qp_init_attr init = {.send_cq = t->dev.cq, .recv_cq = t->dev.cq, .srq = t->srq,
                                    .cap = {.max_send_wr = t->sq_depth, .max_send_sge = 1, .max_recv_sge = 1},
                                    .qp_type = IBV_QPT_RC};
    t->qps[r] = ibv.create_qp(t->dev.pd, &init);
    if (t->qps[r] == NULL) {
      pe_err(err, "%s: cannot create RC queue pair %d of %d on %s: %s", t->who, r + 1, t->world, t->dev.name,
             strerror(errno));
      return -1;
    }
    struct ibv_qp_attr attr = {.qp_state = IBV_QPS_INIT, .pkey_index = 0, .port_num = t->dev.port,
                               .qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE};
    if (modify(t, t->qps[r], &attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS, "INIT",
               err) != 0)
      return -1;
    t->qpn_rank[2 * r] = t->qps[r]->qp_num;
    t->qpn_rank[2 * r + 1] = (uint32_t)r;
  }
  qsort(t->qpn_rank, (size_t)t->world, 2 * sizeof(uint32_t), qpn_cmp);
  t->peers = calloc((size_t)t->world, sizeof *t->peers);
  if (t->peers == NULL) {
    pe_err(err, "%s: out of memory", t->who);
    return -1;
  }
  t->num_peers = t->world;
  for (int r = 0; r < t->world; ++r) t->peers[r].rank = r;
  for (uint32_t i = 0; i < t->rq_depth; ++i)
    if (post_srq_receive(t, i) != 0) {
      pe_err(err, "%s: cannot post receives on %s", t->who, t->dev.name);
      return -1;
    }
  return 0;
}

static int create_srd(pe_transport_t *t, const char *options, char *err) {
  if (depth_option(options, "sq_depth", SRD_SQ_DEPTH, t->dev.efa.max_sq_wr ? t->dev.efa.max_sq_wr : SRD_SQ_DEPTH,
                   t->who, &t->sq_depth, err) < 0 ||
      depth_option(options, "recv_depth", SRD_RQ_DEPTH, t->dev.efa.max_rq_wr ? t->dev.efa.max_rq_wr : SRD_RQ_DEPTH,
                   t->who, &t->rq_depth, err) < 0)
    return -1;
  uint64_t msg = t->dev.pattr.max_msg_sz ? t->dev.pattr.max_msg_sz : 8192;
  if (t->frag && t->frag + sizeof(pe_msg_hdr_t) < msg) msg = t->frag + sizeof(pe_msg_hdr_t);
  if (msg <= sizeof(pe_msg_hdr_t)) {
    pe_err(err, "%s: %s carries messages of %llu bytes, too small for a header", t->who, t->dev.name,
           (unsigned long long)msg);
    return -1;
  }
  t->msg_bytes = (uint32_t)msg;
  t->frag = msg - sizeof(pe_msg_hdr_t);
  if (open_cq(&t->dev, (int)(t->sq_depth + t->rq_depth), t->who, err) != 0) return -1;
  const size_t nbufs = (size_t)t->rq_depth + t->sq_depth + 1;
  if (posix_memalign((void **)&t->bufs, 4096, nbufs * t->msg_bytes) != 0 ||
      (t->free_bufs = malloc(t->sq_depth * sizeof *t->free_bufs)) == NULL) {
    pe_err(err, "%s: out of memory for %zu bounce buffers", t->who, nbufs);
    return -1;
  }
  t->bufs_mr = ibv.reg_mr(t->dev.pd, t->bufs, nbufs * t->msg_bytes, IBV_ACCESS_LOCAL_WRITE);
  if (t->bufs_mr == NULL) {
    pe_err(err, "%s: cannot register %zu bytes of bounce buffers on %s: %s", t->who, nbufs * t->msg_bytes,
           t->dev.name, strerror(errno));
    return -1;
  }
  for (uint32_t i = 0; i < t->sq_depth; ++i) t->free_bufs[i] = t->rq_depth + i;
  t->nfree = t->sq_depth;
  struct ibv_qp_init_attr init = {.send_cq = t->dev.cq, .recv_cq = t->dev.cq,
                                  .cap = {.max_send_wr = t->sq_depth, .max_recv_wr = t->rq_depth,
                                          .max_send_sge = 1, .max_recv_sge = 1},
                                  .qp_type = IBV_QPT_DRIVER};
  t->qp = ibv.efadv_create_driver_qp(t->dev.pd, &init, EFADV_QP_DRIVER_TYPE_SRD);
  if (t->qp == NULL) {
    pe_err(err, "%s: cannot create an SRD queue pair on %s: %s", t->who, t->dev.name, strerror(errno));
    return -1;
  }
  struct ibv_qp_attr attr = {.qp_state = IBV_QPS_INIT, .pkey_index = 0, .port_num = t->dev.port, .qkey = SRD_QKEY};
  if (modify(t, t->qp, &attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_QKEY, "INIT", err) != 0)
    return -1;
  memset(&attr, 0, sizeof attr);
  attr.qp_state = IBV_QPS_RTR;
  if (modify(t, t->qp, &attr, IBV_QP_STATE, "RTR", err) != 0) return -1;
  memset(&attr, 0, sizeof attr);
  attr.qp_state = IBV_QPS_RTS;
  attr.sq_psn = t->psn;
  int mask = IBV_QP_STATE | IBV_QP_SQ_PSN;
  if (t->dev.efa.device_caps & EFADV_DEVICE_ATTR_CAPS_RNR_RETRY) {  // the device retries until a receive is posted
    attr.rnr_retry = 7;
    mask |= IBV_QP_RNR_RETRY;
  }
  if (modify(t, t->qp, &attr, mask, "RTS", err) != 0) return -1;
  for (uint32_t i = 0; i < t->rq_depth; ++i)
    if (post_srd_receive(t, i) != 0) {
      pe_err(err, "%s: cannot post receives on %s", t->who, t->dev.name);
      return -1;
    }
  return 0;
}

static pe_transport_t *vb_create(int efa, const char *options, char *err) {
  const char *who = efa ? "efa transport" : "verbs transport";
  pe_transport_t *t = calloc(1, sizeof *t);
  if (t == NULL) {
    pe_err(err, "%s: out of memory", who);
    return NULL;
  }
  t->efa = efa;
  t->who = who;
  char want[64], why[PE_ERR_LEN] = "";
  int port, gid_index;
  if (parse_common(t, options, err) != 0 ||
      option_int(options, "port", "PORTEP_IB_PORT", 1, who, &port, err) != 0 ||
      option_int(options, "gid_index", "PORTEP_IB_GID_INDEX", -1, who, &gid_index, err) != 0)
    goto fail;
  if (!efa && (t->rank < 0 || t->world < 1)) {
    pe_err(err, "%s: needs rank=R,world=N options (one RC queue pair per rank)", who);
    goto fail;
  }
  if (!efa && (size_t)t->world > VB_MAX_WORLD) {
    pe_err(err, "%s: world=%d exceeds the %zu ranks whose QP numbers fit a %d-byte address", who, t->world,
           (size_t)VB_MAX_WORLD, PE_BLOB_MAX);
    goto fail;
  }
  if (load_libraries(efa, why) != 0) {
    pe_err(err, "%s: %s", who, why);
    goto fail;
  }
  t->table = pe_msg_table_create(NULL, NULL);
  t->seqs = pe_msg_seqs_create();
  if (t->table == NULL || t->seqs == NULL) {
    pe_err(err, "%s: out of memory", who);
    goto fail;
  }
  if (open_device(&t->dev, efa, env_or(options, "device", "PORTEP_IB_DEVICE", want, sizeof want), port, gid_index,
                  why) != 0) {
    pe_err(err, "%s: %s", who, why);
    goto fail;
  }
  t->id = ((uint64_t)getpid() << 32) ^ pe_now_ns();
  t->psn = (uint32_t)(t->id ^ (t->id >> 24)) & 0xffffffu;
  if ((efa ? create_srd(t, options, err) : create_rc(t, options, err)) != 0) goto fail;
  return t;
fail:
  vb_destroy(t);
  return NULL;
}

static pe_transport_t *rc_create(const char *options, char *err) {
  pe_transport_t *t = vb_create(0, options, err);
  if (t == NULL) drop_prefix(err, "verbs transport");
  return t;
}

static pe_transport_t *srd_create(const char *options, char *err) {
  pe_transport_t *t = vb_create(1, options, err);
  if (t == NULL) drop_prefix(err, "efa transport");
  return t;
}

// ----------------------------------------------------------------------------- addresses, peers
static int vb_address(pe_transport_t *t, uint8_t *buf, size_t cap, size_t *len, char *err) {
  const uint32_t nqpn = t->efa ? 1 : (uint32_t)t->world;
  const size_t need = sizeof(vb_address_t) + (size_t)nqpn * VB_QPN_BYTES;
  if (cap < need) {
    pe_err(err, "%s: address buffer of %zu bytes is too small (%zu)", t->who, cap, need);
    return -1;
  }
  vb_address_t a = {.version = VB_VERSION, .kind = t->efa ? VB_KIND_SRD : VB_KIND_RC, .lid = t->dev.pattr.lid,
                    .psn = t->efa ? SRD_QKEY : t->psn, .rank = t->rank, .nqpn = nqpn,
                    .mtu = t->efa ? t->msg_bytes : (uint32_t)t->dev.pattr.active_mtu, .id = t->id};
  memcpy(a.magic, VB_MAGIC, sizeof a.magic);
  memcpy(a.gid, t->dev.gid.raw, sizeof a.gid);
  memcpy(buf, &a, sizeof a);
  for (uint32_t i = 0; i < nqpn; ++i) {
    const uint32_t qpn = t->efa ? t->qp->qp_num : t->qps[i]->qp_num;
    for (int k = 0; k < VB_QPN_BYTES; ++k) buf[sizeof a + i * VB_QPN_BYTES + k] = (uint8_t)(qpn >> (8 * k));
  }
  *len = need;
  return 0;
}

static uint32_t address_qpn(const uint8_t *addr, uint32_t i) {
  uint32_t qpn = 0;
  for (int k = 0; k < VB_QPN_BYTES; ++k) qpn |= (uint32_t)addr[sizeof(vb_address_t) + i * VB_QPN_BYTES + k] << (8 * k);
  return qpn;
}

static int rc_connect(pe_transport_t *t, const vb_address_t *a, const uint8_t *addr, char *err) {
  if ((int)a->nqpn != t->world || a->rank < 0 || a->rank >= t->world) {
    pe_err(err, "%s: the peer is rank %d of %u, this process rank %d of %d: every process must pass the same world",
           t->who, a->rank, a->nqpn, t->rank, t->world);
    return -1;
  }
  vb_peer_t *p = &t->peers[a->rank];
  if (p->used) return a->rank;
  struct ibv_qp *qp = t->qps[a->rank];
  struct ibv_qp_attr attr = {.qp_state = IBV_QPS_RTR,
                             .path_mtu = a->mtu < (uint32_t)t->dev.pattr.active_mtu ? (int)a->mtu
                                                                                     : t->dev.pattr.active_mtu,
                             .dest_qp_num = address_qpn(addr, (uint32_t)t->rank), .rq_psn = a->psn,
                             .max_dest_rd_atomic = 1, .min_rnr_timer = 12};
  attr.ah_attr.port_num = t->dev.port;
  attr.ah_attr.dlid = a->lid;
  memcpy(attr.ah_attr.grh.dgid.raw, a->gid, 16);
  attr.ah_attr.grh.sgid_index = (uint8_t)t->dev.gid_index;
  attr.ah_attr.grh.hop_limit = 64;
  // RoCE always routes by GID; InfiniBand needs the GRH only toward another subnet.
  attr.ah_attr.is_global = t->dev.pattr.link_layer == IBV_LINK_LAYER_ETHERNET ||
                           memcmp(a->gid, t->dev.gid.raw, 8) != 0;
  if (modify(t, qp, &attr,
             IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                 IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER,
             "RTR", err) != 0)
    return -1;
  memset(&attr, 0, sizeof attr);
  attr.qp_state = IBV_QPS_RTS;
  attr.timeout = 14;
  attr.retry_cnt = 7;
  attr.rnr_retry = 7;
  attr.sq_psn = t->psn;
  attr.max_rd_atomic = 1;
  if (modify(t, qp, &attr,
             IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                 IBV_QP_MAX_QP_RD_ATOMIC,
             "RTS", err) != 0)
    return -1;
  if (pe_msg_queue_init(&p->queue, (uint32_t)t->queue_posts, t->queue_bytes) != 0) {
    pe_err(err, "%s: out of memory", t->who);
    return -1;
  }
  p->used = 1;
  p->id = a->id;
  p->frag = t->frag;
  return a->rank;
}

static int srd_connect(pe_transport_t *t, const vb_address_t *a, const uint8_t *addr, char *err) {
  for (int i = 0; i < t->num_peers; ++i)
    if (t->peers[i].id == a->id) return i;
  if (a->mtu <= sizeof(pe_msg_hdr_t)) {
    pe_err(err, "%s: the peer receives messages of %u bytes only", t->who, a->mtu);
    return -1;
  }
  vb_peer_t *more = realloc(t->peers, (size_t)(t->num_peers + 1) * sizeof *more);
  if (more == NULL) {
    pe_err(err, "%s: out of memory", t->who);
    return -1;
  }
  t->peers = more;
  vb_peer_t *p = &t->peers[t->num_peers];
  memset(p, 0, sizeof *p);
  if (a->id == t->id) {  // itself: delivered in place (whether a device loops SRD back is not guaranteed)
    if (pe_msg_queue_init(&p->queue, (uint32_t)t->queue_posts, t->queue_bytes) != 0) {
      pe_err(err, "%s: out of memory", t->who);
      return -1;
    }
    p->used = p->self = 1;
    p->rank = a->rank;
    p->id = a->id;
    p->frag = t->frag;
    return t->num_peers++;
  }
  struct ibv_ah_attr ah = {.is_global = 1, .port_num = t->dev.port};
  memcpy(ah.grh.dgid.raw, a->gid, 16);
  ah.grh.sgid_index = (uint8_t)t->dev.gid_index;
  ah.grh.hop_limit = 255;
  p->ah = ibv.create_ah(t->dev.pd, &ah);
  if (p->ah == NULL) {
    pe_err(err, "%s: cannot create an address handle toward rank %d on %s: %s", t->who, a->rank, t->dev.name,
           strerror(errno));
    return -1;
  }
  if (pe_msg_queue_init(&p->queue, (uint32_t)t->queue_posts, t->queue_bytes) != 0) {
    ibv.destroy_ah(p->ah);
    pe_err(err, "%s: out of memory", t->who);
    return -1;
  }
  p->used = 1;
  p->rank = a->rank;
  p->id = a->id;
  p->qpn = address_qpn(addr, 0);
  p->frag = a->mtu - sizeof(pe_msg_hdr_t) < t->frag ? a->mtu - sizeof(pe_msg_hdr_t) : t->frag;
  return t->num_peers++;
}

static int vb_connect(pe_transport_t *t, const uint8_t *addr, size_t len, char *err) {
  vb_address_t a;
  if (len < sizeof a) {
    pe_err(err, "%s: a %zu-byte peer address is not a verbs address", t->who, len);
    return -1;
  }
  memcpy(&a, addr, sizeof a);
  if (memcmp(a.magic, VB_MAGIC, sizeof a.magic) != 0 || a.version != VB_VERSION ||
      a.kind != (t->efa ? VB_KIND_SRD : VB_KIND_RC) || len != sizeof a + (size_t)a.nqpn * VB_QPN_BYTES) {
    pe_err(err, "%s: the peer address is not an %s address of this version", t->who, t->efa ? "EFA SRD" : "RC");
    return -1;
  }
  return t->efa ? srd_connect(t, &a, addr, err) : rc_connect(t, &a, addr, err);
}

// ------------------------------------------------------------------------------------ regions
static int vb_register(pe_transport_t *t, void *base, size_t len, const char *shm_name, uint8_t *key, size_t cap,
                       size_t *key_len, char *err) {
  (void)shm_name;
  pe_msg_key_t k = {.len = len, .addr = (uint64_t)(uintptr_t)base};
  k.num_counters = pe_msg_window_counters(base, len, &k.sig_base);
  char why[PE_ERR_LEN] = "";
  if (pe_msg_table_add_region(t->table, base, len, k.sig_base, k.num_counters, &k.region, &k.first_counter, why) !=
      0) {
    pe_err(err, "%s: %s", t->who, why);
    return -1;
  }
  struct ibv_mr *mr = NULL;
  if (!t->efa) {  // SRD copies through its bounce buffers: the region itself needs no registration
    mr = ibv.reg_mr(t->dev.pd, base, len, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    if (mr == NULL) {
      pe_err(err, "%s: cannot register %zu bytes on %s: %s", t->who, len, t->dev.name, strerror(errno));
      pe_msg_table_remove_region(t->table, k.region);
      return -1;
    }
    k.rkey = mr->rkey;
  }
  struct ibv_mr **more = realloc(t->mrs, (k.region + 1) * sizeof *more);
  if (more == NULL || pe_msg_key_write(&k, key, cap, key_len, why) != 0) {
    pe_err(err, "%s: %s", t->who, why[0] ? why : "out of memory");
    if (more) t->mrs = more;
    if (mr) ibv.dereg_mr(mr);
    pe_msg_table_remove_region(t->table, k.region);
    return -1;
  }
  t->mrs = more;
  for (int i = t->num_mrs; i <= (int)k.region; ++i) t->mrs[i] = NULL;
  t->num_mrs = (int)k.region + 1;
  t->mrs[k.region] = mr;
  return (int)k.region;
}

static void vb_deregister(pe_transport_t *t, int region) {
  if (region < 0) return;
  pe_msg_table_remove_region(t->table, (uint32_t)region);
  if (region < t->num_mrs && t->mrs[region]) {
    ibv.dereg_mr(t->mrs[region]);
    t->mrs[region] = NULL;
  }
}

static int vb_import(pe_transport_t *t, int peer, const uint8_t *key, size_t len, char *err) {
  pe_msg_key_t k;
  char why[PE_ERR_LEN] = "";
  if (peer < 0 || peer >= t->num_peers || !t->peers[peer].used) {
    pe_err(err, "%s: unknown peer %d", t->who, peer);
    return -1;
  }
  if (pe_msg_key_read(&k, key, len, why) != 0) {
    pe_err(err, "%s: %s", t->who, why);
    return -1;
  }
  const int remote = pe_msg_remotes_add(&t->remotes, peer, &k);
  if (remote < 0) pe_err(err, "%s: out of memory", t->who);
  return remote;
}

static void vb_release(pe_transport_t *t, int remote) {
  pe_msg_remotes_release(&t->remotes, remote);
}

// ------------------------------------------------------------------------------------ sending
// Hand what peer i's queue holds to the device while its send queue has room. Returns work
// requests posted, or -1 when posting failed (the peer is then failed).
static int rc_pump(pe_transport_t *t, int i) {
  vb_peer_t *p = &t->peers[i];
  int posted = 0;
  pe_msg_put_t *put;
  while (!p->failed && p->inflight < t->sq_depth && (put = pe_msg_queue_front(&p->queue)) != NULL) {
    const pe_msg_remote_t *r = &t->remotes.items[put->region];  // RC names remotes by their index here
    pe_msg_hdr_t h;
    uint64_t src;
    pe_msg_put_peek(put, 0, &h, &src);
    struct ibv_sge sge = {.addr = src, .length = h.len, .lkey = (uint32_t)put->cookie};
    struct ibv_send_wr wr = {.wr_id = (uint64_t)i, .send_flags = IBV_SEND_SIGNALED}, *bad = NULL;
    int merged = 0;
    wr.wr.rdma.rkey = r->key.rkey;
    if (h.kind != PE_MSG_SIGNAL) {
      wr.sg_list = &sge;
      wr.num_sge = 1;
      wr.opcode = IBV_WR_RDMA_WRITE;
      wr.wr.rdma.remote_addr = r->key.addr + h.dst_off;
      if (put->npieces > 0 && put->cut + h.len == put->len) {  // the last write carries the signal
        wr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
        wr.imm_data = htonl(pe_msg_put_signal_imm(put, 0));
        merged = 1;
      }
    } else {  // a signal alone (or a further piece of a large value): a zero-byte write with immediate
      wr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
      wr.imm_data = htonl(h.imm);
      wr.wr.rdma.remote_addr = r->key.addr;
    }
    int rc = pe_ibv_post_send(t->qps[i], &wr, &bad);
    if (rc != 0) {
      peer_fail(t, i, "posting an RDMA write failed: %s", strerror(rc));
      return -1;
    }
    p->inflight++;
    t->inflight++;
    pe_msg_queue_sent_one(&p->queue);
    if (merged) pe_msg_queue_sent_one(&p->queue);
    ++posted;
  }
  return posted;
}

// Messages to itself: built in the last bounce buffer and delivered at once.
static int srd_self(pe_transport_t *t, int i) {
  vb_peer_t *p = &t->peers[i];
  uint8_t *buf = t->bufs + (size_t)(t->rq_depth + t->sq_depth) * t->msg_bytes;
  int delivered = 0;
  pe_msg_put_t *put;
  while (!p->failed && (put = pe_msg_queue_front(&p->queue)) != NULL) {
    pe_msg_hdr_t h;
    uint64_t src;
    pe_msg_put_peek(put, t->id, &h, &src);
    memcpy(buf, &h, sizeof h);
    if (h.len) memcpy(buf + sizeof h, (const void *)(uintptr_t)src, h.len);
    char why[PE_ERR_LEN] = "";
    uint64_t origin;
    int ignored;
    int applied = pe_msg_table_deliver(t->table, buf, sizeof h + h.len, &origin, &ignored, why);
    if (applied < 0) {
      peer_fail(t, i, "a message to itself was refused: %s", why);
      return -1;
    }
    t->stats.messages_in++;
    t->stats.signals_applied += (uint64_t)applied;
    pe_msg_queue_sent_one(&p->queue);
    ++delivered;
  }
  return delivered;
}

static int srd_pump(pe_transport_t *t, int i) {
  vb_peer_t *p = &t->peers[i];
  int posted = 0;
  pe_msg_put_t *put;
  if (p->self) return srd_self(t, i);
  while (!p->failed && t->nfree > 0 && p->inflight < SRD_PEER_INFLIGHT &&
         (put = pe_msg_queue_front(&p->queue)) != NULL) {
    pe_msg_hdr_t h;
    uint64_t src;
    pe_msg_put_peek(put, t->id, &h, &src);
    const uint32_t index = t->free_bufs[--t->nfree];
    uint8_t *buf = t->bufs + (size_t)index * t->msg_bytes;
    memcpy(buf, &h, sizeof h);
    if (h.len) memcpy(buf + sizeof h, (const void *)(uintptr_t)src, h.len);
    struct ibv_sge sge = {.addr = (uint64_t)(uintptr_t)buf, .length = (uint32_t)sizeof h + h.len,
                          .lkey = t->bufs_mr->lkey};
    struct ibv_send_wr wr = {.wr_id = (uint64_t)i << 32 | index, .sg_list = &sge, .num_sge = 1,
                             .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED},
                       *bad = NULL;
    wr.wr.ud.ah = p->ah;
    wr.wr.ud.remote_qpn = p->qpn;
    wr.wr.ud.remote_qkey = SRD_QKEY;
    int rc = pe_ibv_post_send(t->qp, &wr, &bad);
    if (rc != 0) {
      t->free_bufs[t->nfree++] = index;
      peer_fail(t, i, "posting a send failed: %s", strerror(rc));
      return -1;
    }
    p->inflight++;
    t->inflight++;
    pe_msg_queue_sent_one(&p->queue);
    ++posted;
  }
  return posted;
}

static int pump(pe_transport_t *t, int i) { return t->efa ? srd_pump(t, i) : rc_pump(t, i); }

static int vb_put_signal(pe_transport_t *t, int region, uint64_t src_off, int remote, uint64_t dst_off, uint64_t len,
                         uint64_t sig_off, int64_t value, char *err) {
  uint64_t region_len = 0;
  uint8_t *base = region >= 0 ? pe_msg_table_region(t->table, (uint32_t)region, &region_len) : NULL;
  const pe_msg_remote_t *r = pe_msg_remotes_get(&t->remotes, remote);
  if (base == NULL || r == NULL) {
    pe_err(err, "%s: unknown region %d or remote region %d", t->who, region, remote);
    return PE_FAILED;
  }
  vb_peer_t *peer = &t->peers[r->peer];
  if (peer->failed) {
    pe_err(err, "%s", peer->error);
    return PE_FAILED;
  }
  if (src_off > region_len || len > region_len - src_off || dst_off > r->key.len || len > r->key.len - dst_off) {
    pe_err(err, "%s: put of %llu bytes from %llu to %llu is outside the regions", t->who, (unsigned long long)len,
           (unsigned long long)src_off, (unsigned long long)dst_off);
    return PE_FAILED;
  }
  const int signal = sig_off != PE_NO_SIGNAL;
  uint32_t counter = 0;
  char why[PE_ERR_LEN] = "";
  if (signal && pe_msg_key_counter(&r->key, sig_off, &counter, why) != 0) {
    pe_err(err, "%s: %s", t->who, why);
    return PE_FAILED;
  }
  if (len == 0 && !signal) return PE_POSTED;
  pe_msg_put_t put;
  // RC: the remote by its index here (the writes need its address and rkey), the local key as the
  // cookie; SRD: the owner's region id, which the message header carries.
  if (pe_msg_put_init(&put, t->efa ? r->key.region : (uint32_t)remote, (uint64_t)(uintptr_t)(base + src_off),
                      dst_off, len, peer->frag, signal, counter, value, why) != 0) {
    pe_err(err, "%s: %s", t->who, why);
    return PE_FAILED;
  }
  if (!t->efa) put.cookie = t->mrs[region] ? t->mrs[region]->lkey : 0;
  if (!pe_msg_queue_has_room(&peer->queue, len)) {
    t->stats.stalls++;
    return PE_BUSY;
  }
  if (signal) {
    uint32_t first;
    if (pe_msg_seqs_take(t->seqs, (uint32_t)r->peer, r->key.region, counter, pe_msg_put_seqs(&put), &first) != 0) {
      pe_err(err, "%s: out of memory", t->who);
      return PE_FAILED;
    }
    pe_msg_put_set_seq(&put, first);
    t->stats.signals++;
  }
  if (len) {
    t->stats.puts++;
    t->stats.bytes += len;
    t->stats.fragments += pe_msg_put_fragments(&put);
  }
  pe_msg_queue_push(&peer->queue, &put);
  if (pump(t, r->peer) < 0) {
    peer->reported = 1;
    pe_err(err, "%s", peer->error);
    return PE_FAILED;
  }
  return PE_POSTED;
}

// ---------------------------------------------------------------------------------- progress
static int report(pe_transport_t *t, int i, int *failed_peer, char *err) {
  t->peers[i].reported = 1;
  *failed_peer = i;
  pe_err(err, "%s", t->peers[i].error);
  return PE_FAILED;
}

static int peer_of_id(const pe_transport_t *t, uint64_t id) {
  for (int i = 0; i < t->num_peers; ++i)
    if (t->peers[i].used && t->peers[i].id == id) return i;
  return -1;
}

// One completion. Returns 1 when it concerned a message that arrived, 0 otherwise.
static int on_completion(pe_transport_t *t, const struct ibv_wc *wc) {
  if (!(wc->wr_id & RECV_WR)) {  // a send: RC wr_id = peer; SRD wr_id = peer << 32 | bounce buffer
    const int i = t->efa ? (int)(wc->wr_id >> 32) : (int)wc->wr_id;
    if (t->efa) t->free_bufs[t->nfree++] = (uint32_t)(wc->wr_id & 0xffffffffu);
    if (i >= 0 && i < t->num_peers) {
      if (t->peers[i].inflight) t->peers[i].inflight--;
      if (wc->status != IBV_WC_SUCCESS)
        peer_fail(t, i, "%s toward it failed: %s (vendor error 0x%x)", t->efa ? "a send" : "an RDMA write",
                  ibv.wc_status_str(wc->status), wc->vendor_err);
    }
    if (t->inflight) t->inflight--;
    return 0;
  }
  const uint32_t index = (uint32_t)(wc->wr_id & ~RECV_WR);
  char why[PE_ERR_LEN] = "";
  int culprit = -1, applied = 0;
  if (!t->efa) {
    culprit = rank_of_qpn(t, wc->qp_num);
    if (wc->status == IBV_WC_SUCCESS && wc->opcode == IBV_WC_RECV_RDMA_WITH_IMM && (wc->wc_flags & IBV_WC_WITH_IMM))
      applied = pe_msg_table_signal(t->table, (uint64_t)culprit, ntohl(wc->imm_data), 0, why);
    else if (wc->status == IBV_WC_SUCCESS) {
      snprintf(why, sizeof why, "unexpected completion (opcode %d)", wc->opcode);
      applied = -1;
    }
    post_srq_receive(t, index);
  } else {
    uint64_t src = 0;
    int ignored = 0;
    if (wc->status == IBV_WC_SUCCESS)
      applied = pe_msg_table_deliver(t->table, t->bufs + (size_t)index * t->msg_bytes, wc->byte_len, &src, &ignored,
                                     why);
    culprit = peer_of_id(t, src);
    post_srd_receive(t, index);
  }
  if (wc->status != IBV_WC_SUCCESS) {
    if (culprit >= 0 && wc->status != IBV_WC_WR_FLUSH_ERR)
      peer_fail(t, culprit, "a receive failed: %s (vendor error 0x%x)", ibv.wc_status_str(wc->status),
                wc->vendor_err);
    return 0;
  }
  t->stats.messages_in++;
  if (applied > 0) t->stats.signals_applied += (uint64_t)applied;
  if (applied < 0 && culprit >= 0) peer_fail(t, culprit, "it broke the protocol: %s", why);
  return 1;
}

static int vb_progress(pe_transport_t *t, int *failed_peer, char *err) {
  struct ibv_cq *ev_cq;
  void *ev_ctx;
  while (t->armed && ibv.get_cq_event(t->dev.channel, &ev_cq, &ev_ctx) == 0) {
    t->dev.events++;
    t->armed = 0;
  }
  if (t->dev.events >= 256) {
    ibv.ack_cq_events(t->dev.cq, t->dev.events);
    t->dev.events = 0;
  }
  int events = 0;
  struct ibv_wc wc[CQ_BATCH];
  for (int total = 0; total < CQ_MAX_PER_PROGRESS;) {
    int n = pe_ibv_poll_cq(t->dev.cq, CQ_BATCH, wc);
    if (n < 0) {
      *failed_peer = -1;
      pe_err(err, "%s: polling the completion queue of %s failed", t->who, t->dev.name);
      return PE_FAILED;
    }
    for (int k = 0; k < n; ++k) events += on_completion(t, &wc[k]);
    total += n;
    if (n < CQ_BATCH) break;
  }
  for (int i = 0; i < t->num_peers; ++i) {
    vb_peer_t *p = &t->peers[i];
    if (p->failed && !p->reported) return report(t, i, failed_peer, err);
    if (!p->used || p->failed || p->queue.count == 0) continue;
    int posted = pump(t, i);
    if (posted < 0) return report(t, i, failed_peer, err);
    events += posted;
  }
  return events;
}

static uint64_t vb_pending(pe_transport_t *t) {
  uint64_t n = t->inflight;
  for (int i = 0; i < t->num_peers; ++i) n += t->peers[i].queue.messages;
  return n;
}

static int vb_wait_fd(pe_transport_t *t) {
  if (!t->armed && pe_ibv_req_notify_cq(t->dev.cq, 0) == 0) t->armed = 1;
  return t->armed ? t->dev.channel->fd : -1;
}

static void vb_stats(pe_transport_t *t, pe_transport_stats_t *out) { *out = t->stats; }

static const pe_transport_ops_t VERBS_OPS = {
    .name = "verbs",
    .create = rc_create,
    .address = vb_address,
    .connect = vb_connect,
    .register_region = vb_register,
    .deregister_region = vb_deregister,
    .import_region = vb_import,
    .release_region = vb_release,
    .put_signal = vb_put_signal,
    .progress = vb_progress,
    .pending = vb_pending,
    .wait_fd = vb_wait_fd,
    .stats = vb_stats,
    .destroy = vb_destroy,
};

static const pe_transport_ops_t EFA_OPS = {
    .name = "efa",
    .create = srd_create,
    .address = vb_address,
    .connect = vb_connect,
    .register_region = vb_register,
    .deregister_region = vb_deregister,
    .import_region = vb_import,
    .release_region = vb_release,
    .put_signal = vb_put_signal,
    .progress = vb_progress,
    .pending = vb_pending,
    .wait_fd = vb_wait_fd,
    .stats = vb_stats,
    .destroy = vb_destroy,
};

const pe_transport_ops_t *pe_transport_verbs(void) { return &VERBS_OPS; }
const pe_transport_ops_t *pe_transport_efa(void) { return &EFA_OPS; }
