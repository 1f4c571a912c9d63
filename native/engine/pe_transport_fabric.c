// The software fabric: processes of one host exchange pe_msgproto messages over Unix datagram
// sockets (abstract namespace: nothing is left on disk), with optional fault injection. It is the
// message-fabric twin of EFA SRD without the hardware: puts travel as fragments, signals after their
// bytes by counting (pe_msgproto), so the protocol's robustness is tested between real processes.
//
// Options ("key=value,..."; unknown keys are ignored):
//   rank=R, world=N   this process's rank (named in errors) and the job size
//   reorder           hold arrivals in a pool and release a random part of what is due at each
//                     poll, in random order (messages overtake each other across polls)
//   delay=N           hold each arrival for N polls (progress calls)
//   drop=P            discard each arrival with probability P
//   seed=S            seed of the fault injection (combined with the rank)
//   fragment=BYTES    largest payload per message (default 64 KiB; 1 KiB when a fault is on, so
//                     that puts are cut into several fragments); at most 256 KiB
//   queue_posts=N, queue_bytes=B   per-peer send queue bounds (default 1024 posts, 16 MiB):
//                     a post beyond them is refused with PE_BUSY until the queue drains
//
// A post is queued toward its peer (the source bytes are read when each fragment is sent, so they
// must stay until pending() is 0) and sent at once as far as the peer's socket takes it; the rest
// goes out in progress(). A peer whose socket is gone (ECONNREFUSED, ENOENT) is marked failed:
// posts toward it fail naming it, every other peer is served as before.
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "pe_msgproto.h"
#include "pe_transport.h"

#define FAB_MAGIC "PEFAB01"
#define FAB_MAX_FRAGMENT (256u << 10)
#define FAB_DEFAULT_FRAGMENT (64u << 10)
#define FAB_FAULT_FRAGMENT 1024u
#define FAB_QUEUE_POSTS 1024u
#define FAB_QUEUE_BYTES (16ull << 20)
#define FAB_SOCKET_BYTES (4 << 20)
#define FAB_RX_BATCH 256
#define FAB_MAX_HOLD_POLLS 8  // reorder: a due message is released at the latest this many polls late

typedef struct fab_address {
  char magic[8];
  uint64_t id;  // the instance, as messages name their source
  int32_t rank;
  int32_t pid;
  uint32_t name_len;
  char name[sizeof(((struct sockaddr_un *)0)->sun_path)];  // abstract: starts with '\0'
} fab_address_t;

typedef struct fab_peer {
  fab_address_t addr;
  struct sockaddr_un sa;
  socklen_t sa_len;
  pe_msg_queue_t queue;
  int failed;
  int reported;  // progress() told the proxy
  char error[PE_ERR_LEN];
} fab_peer_t;

typedef struct fab_held {
  uint64_t arrival;  // arrival order
  uint64_t due;      // first poll it may be delivered at
  uint64_t polled;   // poll it arrived at
  size_t len;
  uint8_t data[];
} fab_held_t;

struct pe_transport {
  int fd;
  fab_address_t self;
  uint64_t frag, queue_posts, queue_bytes;
  int reorder, faults;
  uint64_t delay, seed, rng;
  double drop;
  fab_peer_t *peers;
  int num_peers;
  pe_msg_remotes_t remotes;
  pe_msg_table_t *table;
  pe_msg_seqs_t *seqs;
  fab_held_t **pool;
  size_t pool_len, pool_cap;
  uint64_t polls, arrivals, next_in_order;  // next_in_order: one past the latest arrival delivered
  uint8_t *rx;
  size_t rx_cap;
  uint8_t *released;  // scratch flags of one release pass
  size_t released_cap;
  char last_error[PE_ERR_LEN];  // a malformed message from a source that is no peer
  pe_transport_stats_t stats;
};

// -------------------------------------------------------------------------------------- helpers
static uint64_t rng_next(pe_transport_t *t) {  // xorshift64*
  t->rng ^= t->rng >> 12;
  t->rng ^= t->rng << 25;
  t->rng ^= t->rng >> 27;
  return t->rng * 0x2545F4914F6CDD1Dull;
}

static double rng_unit(pe_transport_t *t) { return (double)(rng_next(t) >> 11) * (1.0 / 9007199254740992.0); }

static void peer_name(const fab_address_t *a, char *out, size_t cap) {
  if (a->rank >= 0)
    snprintf(out, cap, "rank %d (pid %d)", a->rank, a->pid);
  else
    snprintf(out, cap, "the process with pid %d", a->pid);
}

static void peer_fail(pe_transport_t *t, int i, const char *why, int error) {
  fab_peer_t *p = &t->peers[i];
  if (p->failed) return;
  char name[64];
  peer_name(&p->addr, name, sizeof name);
  snprintf(p->error, PE_ERR_LEN, "fabric: %s is unreachable: %s (%s)", name, why, strerror(error));
  p->failed = 1;
  pe_msg_queue_clear(&p->queue);
}

static int peer_of_source(const pe_transport_t *t, uint64_t src) {
  for (int i = 0; i < t->num_peers; ++i)
    if (t->peers[i].addr.id == src) return i;
  return -1;
}

// ------------------------------------------------------------------------------------- lifecycle
// Callers name the transport in front of a create() error (portep.native.engine does): drop ours.
static void drop_prefix(char *err, const char *who) {
  const size_t n = strlen(who);
  if (err != NULL && strncmp(err, who, n) == 0 && err[n] == ':' && err[n + 1] == ' ')
    memmove(err, err + n + 2, strlen(err + n + 2) + 1);
}

static pe_transport_t *fab_create_named(const char *options, const char *who, char *err) {
  uint64_t rank = UINT64_MAX, world = 0, delay = 0, seed = 0, frag = 0, posts = FAB_QUEUE_POSTS,
           bytes = FAB_QUEUE_BYTES;
  double drop = 0.0;
  int reorder = 0;
  if (pe_opt_u64(options, "rank", &rank, who, err) < 0 || pe_opt_u64(options, "world", &world, who, err) < 0 ||
      pe_opt_flag(options, "reorder", &reorder, who, err) < 0 || pe_opt_u64(options, "delay", &delay, who, err) < 0 ||
      pe_opt_double(options, "drop", &drop, who, err) < 0 || pe_opt_u64(options, "seed", &seed, who, err) < 0 ||
      pe_opt_u64(options, "fragment", &frag, who, err) < 0 ||
      pe_opt_u64(options, "queue_posts", &posts, who, err) < 0 ||
      pe_opt_u64(options, "queue_bytes", &bytes, who, err) < 0)
    return NULL;
  if (drop < 0.0 || drop > 1.0) {
    pe_err(err, "%s: drop=%g is not a probability (0..1)", who, drop);
    return NULL;
  }
  if (delay > 1000000) {
    pe_err(err, "%s: delay=%llu polls is too long", who, (unsigned long long)delay);
    return NULL;
  }
  if (rank != UINT64_MAX && (rank > INT32_MAX || (world && rank >= world))) {
    pe_err(err, "%s: rank=%llu is not a rank of world=%llu", who, (unsigned long long)rank, (unsigned long long)world);
    return NULL;
  }
  const int faults = reorder || delay > 0 || drop > 0.0;
  if (frag == 0) frag = faults ? FAB_FAULT_FRAGMENT : FAB_DEFAULT_FRAGMENT;
  if (frag > FAB_MAX_FRAGMENT) {
    pe_err(err, "%s: fragment=%llu is larger than %u bytes", who, (unsigned long long)frag, FAB_MAX_FRAGMENT);
    return NULL;
  }
  if (posts == 0 || posts > (1u << 20) || bytes == 0) {
    pe_err(err, "%s: queue_posts must be in 1..%u and queue_bytes positive", who, 1u << 20);
    return NULL;
  }
  pe_transport_t *t = calloc(1, sizeof *t);
  if (t == NULL) {
    pe_err(err, "%s: out of memory", who);
    return NULL;
  }
  t->fd = -1;
  t->frag = frag;
  t->queue_posts = posts;
  t->queue_bytes = bytes;
  t->reorder = reorder;
  t->delay = delay;
  t->drop = drop;
  t->seed = seed;
  t->faults = faults;
  t->rng = (seed + 1) * 0x9E3779B97F4A7C15ull ^ (rank + 2) * 0xD1B54A32D192ED03ull;
  if (t->rng == 0) t->rng = 1;
  t->rx_cap = sizeof(pe_msg_hdr_t) + FAB_MAX_FRAGMENT;
  t->rx = malloc(t->rx_cap);
  t->table = pe_msg_table_create(NULL, NULL);
  t->seqs = pe_msg_seqs_create();
  if (t->rx == NULL || t->table == NULL || t->seqs == NULL) {
    pe_err(err, "%s: out of memory", who);
    goto fail;
  }
  static uint32_t instances;
  const uint32_t instance = __atomic_add_fetch(&instances, 1, __ATOMIC_RELAXED);
  memcpy(t->self.magic, FAB_MAGIC, sizeof t->self.magic);
  t->self.id = ((uint64_t)getpid() << 32) ^ pe_now_ns() ^ ((uint64_t)instance << 48);
  t->self.rank = rank == UINT64_MAX ? -1 : (int32_t)rank;
  t->self.pid = (int32_t)getpid();
  int n = snprintf(t->self.name + 1, sizeof t->self.name - 1, "portep-fabric-%d-%u-%016llx", (int)getpid(), instance,
                   (unsigned long long)t->self.id);
  t->self.name_len = (uint32_t)n + 1;
  t->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (t->fd < 0) {
    pe_err(err, "%s: cannot create a Unix datagram socket: %s", who, strerror(errno));
    goto fail;
  }
  int size = FAB_SOCKET_BYTES;
  setsockopt(t->fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);  // capped by wmem_max: checked below
  setsockopt(t->fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  memcpy(sa.sun_path, t->self.name, t->self.name_len);
  if (bind(t->fd, (struct sockaddr *)&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + t->self.name_len)) !=
      0) {
    pe_err(err, "%s: cannot bind its socket @%s: %s", who, t->self.name + 1, strerror(errno));
    goto fail;
  }
  int sndbuf = 0;
  socklen_t optlen = sizeof sndbuf;
  if (getsockopt(t->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &optlen) == 0 &&
      (uint64_t)sndbuf < sizeof(pe_msg_hdr_t) + frag + 1024) {
    pe_err(err, "%s: fragment=%llu does not fit the socket's %d-byte send buffer (raise net.core.wmem_max or lower "
           "fragment)", who, (unsigned long long)frag, sndbuf);
    goto fail;
  }
  return t;
fail:
  if (t->fd >= 0) close(t->fd);
  pe_msg_table_destroy(t->table);
  pe_msg_seqs_destroy(t->seqs);
  free(t->rx);
  free(t);
  return NULL;
}

static pe_transport_t *fab_create(const char *options, char *err) {
  static const char *who = "fabric transport";
  pe_transport_t *t = fab_create_named(options, who, err);
  if (t == NULL) drop_prefix(err, who);
  return t;
}

static void fab_destroy(pe_transport_t *t) {
  if (t->fd >= 0) close(t->fd);
  for (int i = 0; i < t->num_peers; ++i) pe_msg_queue_free(&t->peers[i].queue);
  for (size_t i = 0; i < t->pool_len; ++i) free(t->pool[i]);
  free(t->pool);
  free(t->released);
  free(t->peers);
  pe_msg_remotes_free(&t->remotes);
  pe_msg_table_destroy(t->table);
  pe_msg_seqs_destroy(t->seqs);
  free(t->rx);
  free(t);
}

static int fab_address(pe_transport_t *t, uint8_t *buf, size_t cap, size_t *len, char *err) {
  if (cap < sizeof t->self) {
    pe_err(err, "fabric transport: address buffer too small");
    return -1;
  }
  memcpy(buf, &t->self, sizeof t->self);
  *len = sizeof t->self;
  return 0;
}

static int fab_connect(pe_transport_t *t, const uint8_t *addr, size_t len, char *err) {
  fab_address_t a;
  if (len != sizeof a) {
    pe_err(err, "fabric transport: a %zu-byte peer address is not a fabric address", len);
    return -1;
  }
  memcpy(&a, addr, sizeof a);
  if (memcmp(a.magic, FAB_MAGIC, sizeof a.magic) != 0 || a.name_len < 2 || a.name_len > sizeof a.name) {
    pe_err(err, "fabric transport: the peer address is not a fabric address (another transport's?)");
    return -1;
  }
  for (int i = 0; i < t->num_peers; ++i)
    if (t->peers[i].addr.id == a.id) return i;
  fab_peer_t *more = realloc(t->peers, (size_t)(t->num_peers + 1) * sizeof *more);
  if (more == NULL) {
    pe_err(err, "fabric transport: out of memory");
    return -1;
  }
  t->peers = more;
  fab_peer_t *p = &t->peers[t->num_peers];
  memset(p, 0, sizeof *p);
  if (pe_msg_queue_init(&p->queue, (uint32_t)t->queue_posts, t->queue_bytes) != 0) {
    pe_err(err, "fabric transport: out of memory");
    return -1;
  }
  p->addr = a;
  p->sa.sun_family = AF_UNIX;
  memcpy(p->sa.sun_path, a.name, a.name_len);
  p->sa_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + a.name_len);
  return t->num_peers++;
}

// ----------------------------------------------------------------------------------- regions
static int fab_register(pe_transport_t *t, void *base, size_t len, const char *shm_name, uint8_t *key, size_t cap,
                        size_t *key_len, char *err) {
  (void)shm_name;
  pe_msg_key_t k = {.len = len};
  k.num_counters = pe_msg_window_counters(base, len, &k.sig_base);
  if (pe_msg_table_add_region(t->table, base, len, k.sig_base, k.num_counters, &k.region, &k.first_counter, err) != 0)
    return -1;
  if (pe_msg_key_write(&k, key, cap, key_len, err) != 0) {
    pe_msg_table_remove_region(t->table, k.region);
    return -1;
  }
  return (int)k.region;
}

static void fab_deregister(pe_transport_t *t, int region) {
  if (region >= 0) pe_msg_table_remove_region(t->table, (uint32_t)region);
}

static int fab_import(pe_transport_t *t, int peer, const uint8_t *key, size_t len, char *err) {
  pe_msg_key_t k;
  if (peer < 0 || peer >= t->num_peers) {
    pe_err(err, "fabric transport: unknown peer %d", peer);
    return -1;
  }
  if (pe_msg_key_read(&k, key, len, err) != 0) return -1;
  const int remote = pe_msg_remotes_add(&t->remotes, peer, &k);
  if (remote < 0) pe_err(err, "fabric transport: out of memory");
  return remote;
}

static void fab_release(pe_transport_t *t, int remote) {
  pe_msg_remotes_release(&t->remotes, remote);
}

// ------------------------------------------------------------------------------------ sending
// Send what peer i's queue holds until its socket is full. Returns messages sent, or -1 when the
// peer turned out to be gone (it is then failed, its queue dropped).
static int flush_peer(pe_transport_t *t, int i) {
  fab_peer_t *p = &t->peers[i];
  int sent = 0;
  pe_msg_put_t *put;
  while (!p->failed && (put = pe_msg_queue_front(&p->queue)) != NULL) {
    pe_msg_hdr_t h;
    uint64_t src;
    pe_msg_put_peek(put, t->self.id, &h, &src);
    struct iovec iov[2] = {{.iov_base = &h, .iov_len = sizeof h}, {.iov_base = (void *)(uintptr_t)src,
                                                                   .iov_len = h.len}};
    struct msghdr m = {.msg_name = &p->sa, .msg_namelen = p->sa_len, .msg_iov = iov, .msg_iovlen = h.len ? 2 : 1};
    if (sendmsg(t->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS || errno == ENOMEM) break;  // full: later
      int e = errno;
      peer_fail(t, i,
                e == ECONNREFUSED || e == ENOENT || e == ECONNRESET ? "its socket is gone (the process exited?)"
                                                                     : "sending to its socket failed",
                e);
      return -1;
    }
    pe_msg_queue_sent_one(&p->queue);
    ++sent;
  }
  return sent;
}

static int fab_put_signal(pe_transport_t *t, int region, uint64_t src_off, int remote, uint64_t dst_off, uint64_t len,
                          uint64_t sig_off, int64_t value, char *err) {
  uint64_t region_len = 0;
  uint8_t *base = region >= 0 ? pe_msg_table_region(t->table, (uint32_t)region, &region_len) : NULL;
  const pe_msg_remote_t *r = pe_msg_remotes_get(&t->remotes, remote);
  if (base == NULL || r == NULL) {
    pe_err(err, "fabric transport: unknown region %d or remote region %d", region, remote);
    return PE_FAILED;
  }
  fab_peer_t *peer = &t->peers[r->peer];
  if (peer->failed) {
    pe_err(err, "%s", peer->error);
    return PE_FAILED;
  }
  if (src_off > region_len || len > region_len - src_off || dst_off > r->key.len || len > r->key.len - dst_off) {
    pe_err(err, "fabric transport: put of %llu bytes from %llu to %llu is outside the regions",
           (unsigned long long)len, (unsigned long long)src_off, (unsigned long long)dst_off);
    return PE_FAILED;
  }
  const int signal = sig_off != PE_NO_SIGNAL;
  uint32_t counter = 0;
  char why[PE_ERR_LEN] = "";
  if (signal && pe_msg_key_counter(&r->key, sig_off, &counter, why) != 0) {
    pe_err(err, "fabric transport: %s", why);
    return PE_FAILED;
  }
  if (len == 0 && !signal) return PE_POSTED;
  pe_msg_put_t put;
  // The source as an address: the queue reads it when the fragment leaves.
  if (pe_msg_put_init(&put, r->key.region, (uint64_t)(uintptr_t)(base + src_off), dst_off, len, t->frag, signal,
                      counter, value, why) != 0) {
    pe_err(err, "fabric transport: %s", why);
    return PE_FAILED;
  }
  if (!pe_msg_queue_has_room(&peer->queue, len)) {
    t->stats.stalls++;
    return PE_BUSY;
  }
  if (signal) {
    uint32_t first;
    if (pe_msg_seqs_take(t->seqs, (uint32_t)r->peer, r->key.region, counter, pe_msg_put_seqs(&put), &first) != 0) {
      pe_err(err, "fabric transport: out of memory");
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
  if (flush_peer(t, r->peer) < 0) {
    peer->reported = 1;  // the proxy learns it from this call
    pe_err(err, "%s", peer->error);
    return PE_FAILED;
  }
  return PE_POSTED;
}

// ---------------------------------------------------------------------------------- receiving
// Deliver one message; a malformed one from a peer fails that peer (returns -1 with *culprit).
static int deliver(pe_transport_t *t, const uint8_t *msg, size_t len, int *culprit, char *err) {
  uint64_t src = 0;
  int ignored = 0;
  char why[PE_ERR_LEN] = "";
  int applied = pe_msg_table_deliver(t->table, msg, len, &src, &ignored, why);
  if (applied >= 0) {
    t->stats.signals_applied += (uint64_t)applied;
    return 0;
  }
  int i = peer_of_source(t, src);
  if (i < 0) {
    snprintf(t->last_error, sizeof t->last_error, "fabric: a message from an unknown source: %.400s", why);
    return 0;
  }
  char name[64];
  peer_name(&t->peers[i].addr, name, sizeof name);
  snprintf(t->peers[i].error, PE_ERR_LEN, "fabric: %s broke the protocol: %.400s", name, why);
  t->peers[i].failed = 1;
  t->peers[i].reported = 1;
  pe_msg_queue_clear(&t->peers[i].queue);
  *culprit = i;
  pe_err(err, "%s", t->peers[i].error);
  return -1;
}

static int hold(pe_transport_t *t, const uint8_t *msg, size_t len) {
  if (t->drop > 0.0 && rng_unit(t) < t->drop) {
    t->stats.dropped++;
    return 0;
  }
  if (t->pool_len == t->pool_cap) {
    size_t cap = t->pool_cap ? t->pool_cap * 2 : 256;
    fab_held_t **more = realloc(t->pool, cap * sizeof *more);
    if (more == NULL) return -1;
    t->pool = more;
    t->pool_cap = cap;
  }
  fab_held_t *h = malloc(sizeof *h + len);
  if (h == NULL) return -1;
  h->arrival = t->arrivals++;
  h->due = t->polls + t->delay;
  h->polled = t->polls;
  h->len = len;
  memcpy(h->data, msg, len);
  t->pool[t->pool_len++] = h;
  return 0;
}

// Release what is due from the fault pool. Returns messages delivered, or -1 (a peer failed).
static int release(pe_transport_t *t, int *culprit, char *err) {
  if (t->pool_len == 0) return 0;
  if (t->released_cap < t->pool_len) {
    uint8_t *more = realloc(t->released, t->pool_len);
    if (more == NULL) return 0;
    t->released = more;
    t->released_cap = t->pool_len;
  }
  size_t *order = malloc(t->pool_len * sizeof *order);
  if (order == NULL) return 0;
  size_t n = 0;
  for (size_t i = 0; i < t->pool_len; ++i) {
    const fab_held_t *h = t->pool[i];
    int go = h->due <= t->polls;
    if (go && t->reorder && t->polls - h->due < FAB_MAX_HOLD_POLLS) go = rng_next(t) >> 63;  // a coin per poll
    t->released[i] = (uint8_t)go;
    if (go) order[n++] = i;
  }
  if (t->reorder)
    for (size_t i = n; i > 1; --i) {  // Fisher-Yates
      size_t j = (size_t)(rng_next(t) % i);
      size_t tmp = order[i - 1];
      order[i - 1] = order[j];
      order[j] = tmp;
    }
  int rc = 0;
  for (size_t k = 0; k < n; ++k) {  // all of them, even after an error: they left the pool
    fab_held_t *h = t->pool[order[k]];
    if (h->arrival < t->next_in_order)
      t->stats.reordered++;
    else
      t->next_in_order = h->arrival + 1;
    if (t->polls > h->polled) t->stats.delayed++;
    int who = -1;
    char why[PE_ERR_LEN] = "";
    if (deliver(t, h->data, h->len, &who, why) < 0 && rc == 0) {
      rc = -1;
      *culprit = who;
      pe_err(err, "%s", why);
    }
  }
  size_t kept = 0;
  for (size_t i = 0; i < t->pool_len; ++i) {
    if (t->released[i])
      free(t->pool[i]);
    else
      t->pool[kept++] = t->pool[i];
  }
  t->pool_len = kept;
  free(order);
  return rc < 0 ? -1 : (int)n;
}

static int fab_progress(pe_transport_t *t, int *failed_peer, char *err) {
  int events = 0;
  t->polls++;
  for (int i = 0; i < t->num_peers; ++i) {
    fab_peer_t *p = &t->peers[i];
    if (p->failed && !p->reported) {
      p->reported = 1;
      *failed_peer = i;
      pe_err(err, "%s", p->error);
      return PE_FAILED;
    }
    if (p->failed || p->queue.count == 0) continue;
    int sent = flush_peer(t, i);
    if (sent < 0) {
      p->reported = 1;
      *failed_peer = i;
      pe_err(err, "%s", p->error);
      return PE_FAILED;
    }
    events += sent;
  }
  for (int k = 0; k < FAB_RX_BATCH; ++k) {
    ssize_t n = recv(t->fd, t->rx, t->rx_cap, MSG_DONTWAIT | MSG_TRUNC);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      *failed_peer = -1;
      pe_err(err, "fabric: receiving from its socket failed: %s", strerror(errno));
      return PE_FAILED;
    }
    t->stats.messages_in++;
    events++;
    size_t len = (size_t)n < t->rx_cap ? (size_t)n : t->rx_cap;  // a truncated message fails its length check
    if (t->faults && hold(t, t->rx, len) == 0) continue;
    int culprit = -1;
    if (deliver(t, t->rx, len, &culprit, err) < 0) {
      *failed_peer = culprit;
      return PE_FAILED;
    }
  }
  if (t->faults) {
    int culprit = -1;
    int n = release(t, &culprit, err);
    if (n < 0) {
      *failed_peer = culprit;
      return PE_FAILED;
    }
    events += n;
  }
  return events;
}

static uint64_t fab_pending(pe_transport_t *t) {
  uint64_t n = t->pool_len;
  for (int i = 0; i < t->num_peers; ++i) n += t->peers[i].queue.messages;
  return n;
}

static int fab_wait_fd(pe_transport_t *t) { return t->fd; }

static void fab_stats(pe_transport_t *t, pe_transport_stats_t *out) { *out = t->stats; }

static const pe_transport_ops_t FABRIC_OPS = {
    .name = "fabric",
    .create = fab_create,
    .address = fab_address,
    .connect = fab_connect,
    .register_region = fab_register,
    .deregister_region = fab_deregister,
    .import_region = fab_import,
    .release_region = fab_release,
    .put_signal = fab_put_signal,
    .progress = fab_progress,
    .pending = fab_pending,
    .wait_fd = fab_wait_fd,
    .stats = fab_stats,
    .destroy = fab_destroy,
};

const pe_transport_ops_t *pe_transport_fabric(void) { return &FABRIC_OPS; }
