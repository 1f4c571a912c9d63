// The proxy thread (see pe_proxy.h).
#define _GNU_SOURCE
#include "pe_proxy.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define BATCH 256
#define IDLE_SLEEP_MS 5  // the longest an idle proxy sleeps before it looks around again
#define MAX_PEERS 4096  // fixed tables: ranks read them without the lock, so they never move
#define MAX_ENDPOINTS 256

typedef struct peer {
  uint8_t addr[PE_BLOB_MAX];
  size_t addr_len;
  int id;                    // the transport's peer id
  int failed;                // written once (release) by the proxy thread
  char error[PE_ERR_LEN];    // why, written before `failed`
} peer_t;

typedef struct rank_route {
  int peer;    // index into proxy->peers, -1 when unknown
  int remote;  // the transport's remote region id
  int broken;  // test hook: posts toward this rank fail
  int failed;  // this rank alone is unreachable (written once, release), see `broken`
} rank_route_t;

typedef struct pending_op {
  portep_descriptor_t d;
} pending_op_t;

typedef struct endpoint {
  int used;
  int closing;  // set by remove: the proxy drains then forgets it
  int closed;   // set by the proxy thread (release)
  pe_ring_t *ring;
  pe_window_t *window;
  int region;
  int world;
  rank_route_t *routes;
  pending_op_t *backlog;  // descriptors the transport could not take yet, in ring order
  uint64_t backlog_len, backlog_cap;
  uint64_t signals_offset, data_offset;
} endpoint_t;

struct pe_proxy {
  const pe_transport_ops_t *ops;
  pe_transport_t *transport;
  pthread_t thread;
  pthread_mutex_t lock;  // held by the thread while it steps, and by control calls
  int wake_fd;
  uint64_t stay_awake_ns;  // idle time spent spinning, yielding and napping before the thread sleeps
  int stop;        // control -> thread (release)
  int sleeping;    // thread -> ranks: 1 while it blocks in poll()
  int stopped;     // thread -> control
  int failed;      // the transport failed as a whole
  char error[PE_ERR_LEN];
  peer_t *peers;          // MAX_PEERS
  int num_peers;
  endpoint_t *endpoints;  // MAX_ENDPOINTS
  int num_endpoints;      // high-water mark; removed endpoints leave holes that are reused
  pe_proxy_stats_t stats;
};

// ------------------------------------------------------------------------------------ posting
static void mark_peer_failed(pe_proxy_t *p, int peer, const char *why) {
  if (peer < 0 || peer >= p->num_peers || pe_load_acquire_i32(&p->peers[peer].failed)) return;
  snprintf(p->peers[peer].error, PE_ERR_LEN, "%s", why);
  pe_store_release_i32(&p->peers[peer].failed, 1);
  p->stats.failed_peers++;
}

static int peer_of_transport_id(pe_proxy_t *p, int id) {
  for (int i = 0; i < p->num_peers; ++i)
    if (p->peers[i].id == id) return i;
  return -1;
}

// Post one descriptor. Returns PE_POSTED (also when it was dropped because its peer failed) or
// PE_BUSY.
static int post(pe_proxy_t *p, endpoint_t *ep, const portep_descriptor_t *d) {
  char err[PE_ERR_LEN];
  err[0] = '\0';
  if (d->dst_rank >= (uint32_t)ep->world) {
    snprintf(p->error, PE_ERR_LEN, "descriptor for rank %u of a group of %d", d->dst_rank, ep->world);
    return PE_POSTED;
  }
  rank_route_t *route = &ep->routes[d->dst_rank];
  if (route->peer < 0) return PE_POSTED;
  peer_t *peer = &p->peers[route->peer];
  if (pe_load_acquire_i32(&peer->failed)) return PE_POSTED;  // nothing reaches a failed peer
  if (route->broken) {  // as a link that went down: this rank fails, its process's other ranks do not
    if (!route->failed) p->stats.failed_peers++;
    pe_store_release_i32(&route->failed, 1);
    return PE_POSTED;
  }
  uint64_t len = 0, sig_off = PE_NO_SIGNAL;
  switch (d->opcode) {
    case PORTEP_OP_PUT:
      len = d->length;
      break;
    case PORTEP_OP_PUT_SIGNAL:
      len = d->length;
      sig_off = ep->signals_offset + (uint64_t)d->signal_slot * sizeof(int64_t);
      break;
    case PORTEP_OP_SIGNAL:
      sig_off = ep->signals_offset + (uint64_t)d->signal_slot * sizeof(int64_t);
      break;
    default:
      return PE_POSTED;  // FENCE / BARRIER: streams never need them (counters order everything)
  }
  int rc = p->ops->put_signal(p->transport, ep->region, ep->data_offset + d->src_offset, route->remote,
                              ep->data_offset + d->dst_offset, len, sig_off, d->signal_value, err);
  if (rc == PE_BUSY) return PE_BUSY;
  if (rc != PE_POSTED) {
    mark_peer_failed(p, route->peer, err[0] ? err : "the transport refused a put");
    return PE_POSTED;
  }
  p->stats.posted++;
  return PE_POSTED;
}

static int backlog_push(endpoint_t *ep, const portep_descriptor_t *d) {
  if (ep->backlog_len == ep->backlog_cap) {
    uint64_t cap = ep->backlog_cap ? ep->backlog_cap * 2 : 256;
    pending_op_t *more = realloc(ep->backlog, cap * sizeof *more);
    if (more == NULL) return -1;
    ep->backlog = more;
    ep->backlog_cap = cap;
  }
  ep->backlog[ep->backlog_len++].d = *d;
  return 0;
}

// Post what the backlog holds, keeping each peer's order: once a peer is busy, its later
// descriptors wait for the next pass. Returns descriptors posted.
static uint64_t post_backlog(pe_proxy_t *p, endpoint_t *ep) {
  if (ep->backlog_len == 0) return 0;
  uint8_t busy_small[256] = {0};
  uint8_t *busy = ep->world <= 256 ? busy_small : calloc((size_t)ep->world, 1);
  if (busy == NULL) return 0;
  uint64_t kept = 0, posted = 0;
  for (uint64_t i = 0; i < ep->backlog_len; ++i) {
    portep_descriptor_t *d = &ep->backlog[i].d;
    uint32_t r = d->dst_rank < (uint32_t)ep->world ? d->dst_rank : 0;
    if (!busy[r] && post(p, ep, d) == PE_POSTED) {
      ++posted;
      continue;
    }
    busy[r] = 1;
    ep->backlog[kept++] = ep->backlog[i];
  }
  ep->backlog_len = kept;
  if (busy != busy_small) free(busy);
  return posted;
}

// Merge runs of PUTs to one peer whose source and destination are both contiguous; a PUT_SIGNAL
// absorbs the contiguous PUTs before it (its signal then guards them all, as the producer, who
// wrote them first, asked). Returns the new count.
static uint64_t coalesce(portep_descriptor_t *items, uint64_t n) {
  uint64_t out = 0;
  for (uint64_t i = 0; i < n; ++i) {
    portep_descriptor_t *d = &items[i];
    if (out > 0 && (d->opcode == PORTEP_OP_PUT || d->opcode == PORTEP_OP_PUT_SIGNAL)) {
      portep_descriptor_t *last = &items[out - 1];
      if (last->opcode == PORTEP_OP_PUT && last->dst_rank == d->dst_rank &&
          last->src_offset + last->length == d->src_offset && last->dst_offset + last->length == d->dst_offset &&
          (uint64_t)last->length + d->length <= UINT32_MAX) {
        last->opcode = d->opcode;
        last->length += d->length;
        last->signal_slot = d->signal_slot;
        last->signal_value = d->signal_value;
        continue;
      }
    }
    if (out != i) items[out] = *d;
    out++;
  }
  return out;
}

static uint64_t drain_endpoint(pe_proxy_t *p, endpoint_t *ep) {
  uint64_t work = post_backlog(p, ep);
  portep_descriptor_t batch[BATCH];
  uint64_t depth = pe_ring_pending(ep->ring);
  if (depth > p->stats.max_queue_depth) p->stats.max_queue_depth = depth;
  uint64_t n = pe_ring_pop(ep->ring, batch, BATCH);
  if (n == 0) return work;
  p->stats.descriptors += n;
  uint64_t m = coalesce(batch, n);
  p->stats.coalesced += n - m;
  for (uint64_t i = 0; i < m; ++i) {
    if (ep->backlog_len == 0 && post(p, ep, &batch[i]) == PE_POSTED) continue;
    if (backlog_push(ep, &batch[i]) != 0) snprintf(p->error, PE_ERR_LEN, "proxy: out of memory");
  }
  return work + n;
}

// One pass of the loop; returns the work done (0: idle).
static uint64_t step(pe_proxy_t *p) {
  uint64_t work = 0;
  for (int e = 0; e < p->num_endpoints; ++e) {
    endpoint_t *ep = &p->endpoints[e];
    if (!ep->used || pe_load_acquire_i32(&ep->closed)) continue;
    work += drain_endpoint(p, ep);
  }
  int failed_peer = -1;
  char err[PE_ERR_LEN] = "";
  int events = p->ops->progress(p->transport, &failed_peer, err);
  if (events > 0) work += (uint64_t)events;
  if (events < 0) {
    int peer = peer_of_transport_id(p, failed_peer);
    if (peer >= 0) {
      mark_peer_failed(p, peer, err[0] ? err : "transport error");
    } else if (!p->failed) {
      snprintf(p->error, PE_ERR_LEN, "the %s transport failed: %s", p->ops->name, err[0] ? err : "unknown error");
      pe_store_release_i32(&p->failed, 1);
    }
  }
  uint64_t backlog = 0;
  for (int e = 0; e < p->num_endpoints; ++e) {
    endpoint_t *ep = &p->endpoints[e];
    if (!ep->used) continue;
    backlog += ep->backlog_len;
    if (ep->closing && !ep->closed && ep->backlog_len == 0 && pe_ring_pending(ep->ring) == 0 &&
        p->ops->pending(p->transport) == 0)
      pe_store_release_i32(&ep->closed, 1);
  }
  p->stats.backlog = backlog;
  p->stats.steps++;
  return work;
}

static int rings_have_work(pe_proxy_t *p) {
  for (int e = 0; e < p->num_endpoints; ++e) {
    endpoint_t *ep = &p->endpoints[e];
    if (ep->used && !ep->closed && (pe_ring_pending(ep->ring) || ep->backlog_len)) return 1;
  }
  return 0;
}

static void sleep_until_work(pe_proxy_t *p) {
  struct pollfd fds[2] = {{.fd = p->wake_fd, .events = POLLIN}, {.fd = -1, .events = POLLIN}};
  int nfds = 1;
  int tfd = p->ops->wait_fd(p->transport);
  if (tfd >= 0) {
    fds[1].fd = tfd;
    nfds = 2;
  }
  pe_store_release_i32(&p->sleeping, 1);
  pe_fence_seq();  // pairs with pe_proxy_wake: a push either is seen here or sees `sleeping`
  int busy = rings_have_work(p) || pe_load_acquire_i32(&p->stop) || p->ops->pending(p->transport);
  pthread_mutex_unlock(&p->lock);
  if (!busy) {
    p->stats.sleeps++;
    // With operations in flight the transport may need progress without waking its fd: nap briefly.
    if (poll(fds, (nfds_t)nfds, IDLE_SLEEP_MS) > 0 && (fds[0].revents & POLLIN)) {
      uint64_t count;
      if (read(p->wake_fd, &count, sizeof count) == sizeof count) p->stats.wakeups++;
    }
  }
  pe_store_release_i32(&p->sleeping, 0);
  pthread_mutex_lock(&p->lock);
}

static void *proxy_main(void *arg) {
  pe_proxy_t *p = arg;
  pe_backoff_t idle;
  pe_backoff_init(&idle, 50);
  uint64_t idle_since = 0;
  pthread_mutex_lock(&p->lock);
  while (!pe_load_acquire_i32(&p->stop)) {
    if (step(p)) {
      pe_backoff_reset(&idle);
      idle_since = 0;
      continue;
    }
    p->stats.idle_polls++;
    const uint64_t now = pe_now_ns();
    if (!idle_since) idle_since = now;
    if (now - idle_since < p->stay_awake_ns) {
      pthread_mutex_unlock(&p->lock);
      pe_backoff_step(&idle);
      pthread_mutex_lock(&p->lock);
      continue;
    }
    sleep_until_work(p);
    pe_backoff_reset(&idle);
    idle_since = 0;
  }
  pthread_mutex_unlock(&p->lock);
  return NULL;
}

// ------------------------------------------------------------------------------------ control
pe_proxy_t *pe_proxy_create(const pe_transport_ops_t *ops, const char *options, uint64_t stay_awake_ns, char *err) {
  pe_proxy_t *p = calloc(1, sizeof *p);
  if (p == NULL) {
    pe_err(err, "proxy: out of memory");
    return NULL;
  }
  p->ops = ops;
  p->stay_awake_ns = stay_awake_ns;
  p->peers = calloc(MAX_PEERS, sizeof *p->peers);
  p->endpoints = calloc(MAX_ENDPOINTS, sizeof *p->endpoints);
  p->transport = p->peers && p->endpoints ? ops->create(options, err) : NULL;
  if (p->transport == NULL) {
    if (!p->peers || !p->endpoints) pe_err(err, "proxy: out of memory");
    free(p->peers);
    free(p->endpoints);
    free(p);
    return NULL;
  }
  p->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  pthread_mutex_init(&p->lock, NULL);
  int rc = pthread_create(&p->thread, NULL, proxy_main, p);
  if (p->wake_fd < 0 || rc != 0) {
    pe_err(err, "proxy: cannot start its thread: %s", strerror(rc ? rc : errno));
    if (p->wake_fd >= 0) close(p->wake_fd);
    ops->destroy(p->transport);
    free(p->peers);
    free(p->endpoints);
    free(p);
    return NULL;
  }
  return p;
}

const char *pe_proxy_transport_name(const pe_proxy_t *p) { return p->ops->name; }

int pe_proxy_address(pe_proxy_t *p, uint8_t *buf, size_t cap, size_t *len, char *err) {
  pthread_mutex_lock(&p->lock);
  int rc = p->ops->address(p->transport, buf, cap, len, err);
  pthread_mutex_unlock(&p->lock);
  return rc;
}

int pe_proxy_connect(pe_proxy_t *p, const uint8_t *addr, size_t len, char *err) {
  if (len > PE_BLOB_MAX) {
    pe_err(err, "proxy: peer address of %zu bytes is too long", len);
    return -1;
  }
  pthread_mutex_lock(&p->lock);
  int found = -1;
  for (int i = 0; i < p->num_peers && found < 0; ++i)
    if (p->peers[i].addr_len == len && memcmp(p->peers[i].addr, addr, len) == 0) found = i;
  if (found < 0 && p->num_peers == MAX_PEERS) {
    pe_err(err, "proxy: more than %d peer processes", MAX_PEERS);
  } else if (found < 0) {
    int id = p->ops->connect(p->transport, addr, len, err);
    if (id >= 0) {
      peer_t *peer = &p->peers[p->num_peers];
      memset(peer, 0, sizeof *peer);
      memcpy(peer->addr, addr, len);
      peer->addr_len = len;
      peer->id = id;
      found = p->num_peers++;
    }
  }
  pthread_mutex_unlock(&p->lock);
  return found;
}

int pe_proxy_add_endpoint(pe_proxy_t *p, pe_ring_t *ring, pe_window_t *window, int world, uint8_t *key, size_t cap,
                          size_t *key_len, char *err) {
  pthread_mutex_lock(&p->lock);
  int id = -1;
  int slot = 0;
  while (slot < p->num_endpoints && p->endpoints[slot].used) ++slot;
  if (slot == MAX_ENDPOINTS) {
    pe_err(err, "proxy: more than %d Buffers share it", MAX_ENDPOINTS);
    pthread_mutex_unlock(&p->lock);
    return -1;
  }
  int region = p->ops->register_region(p->transport, window->shm.base, window->shm.len, window->shm.name, key, cap,
                                       key_len, err);
  rank_route_t *routes = region < 0 ? NULL : calloc((size_t)world, sizeof *routes);
  if (routes != NULL) {
    for (int r = 0; r < world; ++r) routes[r] = (rank_route_t){.peer = -1, .remote = -1};
    p->endpoints[slot] = (endpoint_t){.used = 1, .ring = ring, .window = window, .region = region, .world = world,
                                      .routes = routes, .signals_offset = pe_window_signals_offset(),
                                      .data_offset = pe_window_data_offset(window->num_signals)};
    id = slot;
    if (slot == p->num_endpoints) p->num_endpoints++;
  } else if (region >= 0) {
    p->ops->deregister_region(p->transport, region);
    pe_err(err, "proxy: out of memory");
  }
  pthread_mutex_unlock(&p->lock);
  return id;
}

int pe_proxy_set_rank(pe_proxy_t *p, int ep, int rank, int peer, const uint8_t *key, size_t key_len, char *err) {
  pthread_mutex_lock(&p->lock);
  int rc = -1;
  if (ep < 0 || ep >= p->num_endpoints || !p->endpoints[ep].used || rank < 0 || rank >= p->endpoints[ep].world ||
      peer < 0 || peer >= p->num_peers) {
    pe_err(err, "proxy: bad endpoint %d / rank %d / peer %d", ep, rank, peer);
  } else {
    int remote = p->ops->import_region(p->transport, p->peers[peer].id, key, key_len, err);
    if (remote >= 0) {
      p->endpoints[ep].routes[rank] = (rank_route_t){.peer = peer, .remote = remote};
      rc = 0;
    }
  }
  pthread_mutex_unlock(&p->lock);
  return rc;
}

int pe_proxy_remove_endpoint(pe_proxy_t *p, int ep, double timeout_s) {
  if (ep < 0 || ep >= p->num_endpoints) return 0;
  pthread_mutex_lock(&p->lock);
  endpoint_t *e = &p->endpoints[ep];
  int used = e->used;
  e->closing = 1;
  pthread_mutex_unlock(&p->lock);
  if (!used) return 0;
  double deadline = pe_now_s() + timeout_s;
  pe_backoff_t b;
  pe_backoff_init(&b, 1000);
  int late = 0;
  while (!pe_load_acquire_i32(&e->closed) && !pe_load_acquire_i32(&p->stopped)) {
    if (pe_now_s() > deadline) {
      late = 1;
      break;
    }
    pe_proxy_wake(p);
    pe_backoff_step(&b);
  }
  pthread_mutex_lock(&p->lock);
  e = &p->endpoints[ep];
  for (int r = 0; r < e->world; ++r)
    if (e->routes[r].remote >= 0) p->ops->release_region(p->transport, e->routes[r].remote);
  p->ops->deregister_region(p->transport, e->region);
  free(e->routes);
  free(e->backlog);
  memset(e, 0, sizeof *e);
  pthread_mutex_unlock(&p->lock);
  return late;
}

void pe_proxy_wake(pe_proxy_t *p) {
  pe_fence_seq();
  if (!pe_load_acquire_i32(&p->sleeping)) return;
  uint64_t one = 1;
  if (write(p->wake_fd, &one, sizeof one) < 0) {
    // a full eventfd counter still wakes the thread
  }
}

uint64_t pe_proxy_help(pe_proxy_t *p) {
  if (pe_load_acquire_i32(&p->stop) || pthread_mutex_trylock(&p->lock) != 0) {
    pe_proxy_wake(p);
    return 0;
  }
  const uint64_t work = step(p);
  const int more = rings_have_work(p) || p->ops->pending(p->transport);
  p->stats.helped_steps++;
  pthread_mutex_unlock(&p->lock);
  if (more) pe_proxy_wake(p);
  return work;
}

int pe_proxy_rank_status(pe_proxy_t *p, int ep, int rank, char *err) {
  if (pe_load_acquire_i32(&p->failed)) {
    pe_err(err, "%s", p->error);
    return -1;
  }
  if (ep < 0 || ep >= p->num_endpoints) return 0;
  endpoint_t *e = &p->endpoints[ep];
  if (!e->used || rank < 0 || rank >= e->world) return 0;
  if (pe_load_acquire_i32(&e->routes[rank].failed)) {
    pe_err(err, "the link to rank %d was broken on purpose (test hook)", rank);
    return -1;
  }
  int peer = e->routes[rank].peer;
  if (peer < 0 || !pe_load_acquire_i32(&p->peers[peer].failed)) return 0;
  pe_err(err, "%s", p->peers[peer].error);
  return -1;
}

int pe_proxy_status(pe_proxy_t *p, char *err) {
  if (!pe_load_acquire_i32(&p->failed)) return 0;
  pe_err(err, "%s", p->error);
  return -1;
}

void pe_proxy_stats(pe_proxy_t *p, pe_proxy_stats_t *out) {
  pthread_mutex_lock(&p->lock);
  *out = p->stats;
  p->ops->stats(p->transport, &out->transport);
  pthread_mutex_unlock(&p->lock);
}

void pe_proxy_break_rank(pe_proxy_t *p, int ep, int rank) {
  pthread_mutex_lock(&p->lock);
  if (ep >= 0 && ep < p->num_endpoints && rank >= 0 && rank < p->endpoints[ep].world)
    p->endpoints[ep].routes[rank].broken = 1;
  pthread_mutex_unlock(&p->lock);
}

void pe_proxy_destroy(pe_proxy_t *p, double timeout_s) {
  double deadline = pe_now_s() + timeout_s;
  pe_backoff_t b;
  pe_backoff_init(&b, 1000);
  for (;;) {  // let the thread post what the rings hold and the transport finish, within the deadline
    pthread_mutex_lock(&p->lock);
    int busy = rings_have_work(p) || p->ops->pending(p->transport);
    pthread_mutex_unlock(&p->lock);
    if (!busy || pe_now_s() > deadline) break;
    pe_proxy_wake(p);
    pe_backoff_step(&b);
  }
  pe_store_release_i32(&p->stop, 1);
  uint64_t one = 1;
  if (write(p->wake_fd, &one, sizeof one) < 0) {
    // the thread also wakes up on its own within IDLE_SLEEP_MS
  }
  pthread_join(p->thread, NULL);
  pe_store_release_i32(&p->stopped, 1);
  for (int e = 0; e < p->num_endpoints; ++e) {
    endpoint_t *ep = &p->endpoints[e];
    if (!ep->used) continue;
    free(ep->routes);
    free(ep->backlog);
  }
  p->ops->destroy(p->transport);
  close(p->wake_fd);
  pthread_mutex_destroy(&p->lock);
  free(p->endpoints);
  free(p->peers);
  free(p);
}
