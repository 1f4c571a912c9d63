// The UCX transport: portep's compiled proxy over libucp (shared memory, TCP, and whatever else UCX
// reaches: InfiniBand / RoCE verbs, ...), the fabric chosen by UCX itself (UCX_TLS, UCX_NET_DEVICES).
//
// One UCP context and worker per instance (features RMA, AM and WAKEUP), driven by the proxy's
// thread (the worker is SERIALIZED: control calls come from other threads, under the proxy's lock).
// The address blob is a small identity header (pid, host, boot id, pid namespace) followed by the
// worker address; a region key is its base address and length followed by the packed rkey.
//
// put_signal takes one of three paths, each keeping the guarantee of pe_transport.h by a rule of
// UCX's API documentation (ucp.h):
//  - up to `bundle` bytes (default 1 KiB): the put is copied into the peer's bundle, one active
//    message per peer and progress() pass (up to 8000 bytes) carrying puts and signals in order;
//  - up to `inline` bytes (default 8 KiB): one active message carries the bytes and the signal,
//    sent from the window in place;
//    for both, the receiving worker's handler copies the bytes into the window, then applies the
//    signal with pe_signal_apply (release add, then the doorbell): one message, one order;
//  - larger: ucp_put_nbx, and the signal waits in the peer's batch. The next progress() issues
//    ucp_ep_flush_nbx on the peer's endpoint: "all the AMO and RMA operations issued on the ep prior
//    to this call are completed both at the origin and at the target endpoint" once it completes,
//    and only then is the batch of signals sent (one active message) and applied at the target
//    with pe_signal_apply. A fence would not do: ucp_worker_fence orders RMA and AMO operations,
//    not active messages (puts striped over several lanes do overtake a signal sent on one), and
//    a put-fence-atomic would wake no rank sleeping on the window's doorbell.
// Software-emulated RMA (tcp) needs the target to progress its worker: its proxy does, and sleeps
// in poll() on the worker's event fd (wait_fd).
//
// Flow control: per peer, at most `max_ops` operations (default 256) and `max_bytes` bytes
// (default 16 MiB; a larger put may go alone) are in flight, counted until their bytes are known to
// have left (bundles and active messages) or landed (RMA puts: the covering flush completed);
// beyond them put_signal says PE_BUSY (stats.stalls). Measured between two processes on 2 shared
// cores (one stream of puts-with-signal on one counter, tests/test_transport_ucx.py; the figures
// follow the load of the shared cores): 1 MiB puts 5-9 GB/s over sm (cma) and 1.5-5 GB/s over tcp
// (loopback); 64-byte puts 3-3.6 M/s over both, which is what the test's Python producer pushes
// through the shm transport too (without bundles: 0.2-0.45 M/s over tcp). A quarter or four times the
// operations or bytes in flight changed nothing measurable there; 64 KiB puts went faster as RMA
// puts than as active messages.
//
// Failures concern one peer. Peers on another host are connected with UCP_ERR_HANDLING_MODE_PEER
// (UCX reports their failure: transport errors, keepalive). Peers on this host use
// UCP_ERR_HANDLING_MODE_NONE: the posix and sysv shared-memory transports expose no peer-failure
// handling (UCX_MM_ERROR_HANDLING defaults to no), and UCX leaves transports without it out of
// PEER-mode endpoints; such a peer's death is seen through its pid (a pidfd), and transport errors
// (a cma write to a dead process, a reset connection) still reach the endpoint's error handler. A
// failed peer's endpoint is closed forcibly (its requests end with UCS_ERR_CANCELED), its remote
// keys are destroyed, and posts toward it fail with a message naming it.
//
// Options: "max_ops=N,max_bytes=N,inline=N,bundle=N" (bundle=0: no bundles; inline=0 as well:
// every put is an RMA put), and "rank=R,world=W" (the job's, given to every transport: the rank
// names this process in its peers' error messages).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

// UCX's headers are not -Wsign-compare clean (UCS_MASK), and the build passes them with -I.
#include <ucp/api/ucp.h>  // a system include (-isystem): UCX's own headers are not held to -Wsign-compare

#include "pe_transport.h"
#include "pe_window.h"

#define ADDRESS_MAGIC 0x31584355u  // "UCX1"
#define KEY_MAGIC 0x314b4355u      // "UCK1"
#define AM_PUT 1                   // header: put_header_t; data: the bytes
#define AM_SIGNALS 2               // data: signal_entry_t[]
#define AM_BUNDLE 3                // data: (bundle_entry_t, bytes padded to 8)[]
#define BUNDLE_BYTES 8000          // a bundle fits one eager fragment of the shared-memory transports
#define PROGRESS_ROUNDS 64         // ucp_worker_progress calls per progress(), at most
#define ARM_TRIES 4
#define LIVENESS_PERIOD_NS 20000000ull  // how often same-host peers' pids are checked
#define CLOSE_TIMEOUT_S 2.0
#define OPS_PER_CHUNK 256
#define DEFAULT_MAX_OPS 256
#define DEFAULT_MAX_BYTES (16ull << 20)
#define DEFAULT_INLINE 8192
#define DEFAULT_BUNDLE 1024

static void apply_signal(void *base, uint64_t sig_off, int64_t value) { pe_signal_apply(base, sig_off, value); }

// ------------------------------------------------------------------------------------ wire formats
typedef struct address_header {
  uint32_t magic;
  uint32_t worker_len;  // bytes of the UCP worker address that follow
  int64_t pid;
  uint64_t pidns;    // inode of /proc/self/ns/pid: pids compare only within one namespace
  int32_t rank;      // the process's rank in the job (option rank=), -1 when not given
  uint32_t reserved;
  char boot_id[40];  // /proc/sys/kernel/random/boot_id: one value per running kernel (host)
  char host[64];
} address_header_t;

typedef struct key_header {
  uint32_t magic;
  uint32_t rkey_len;  // bytes of the packed rkey that follow
  uint64_t base;
  uint64_t len;
} key_header_t;

typedef struct put_header {
  uint64_t base;  // the target region's base address, from its key
  uint64_t dst_off;
  uint64_t sig_off;  // PE_NO_SIGNAL: bytes alone
  int64_t value;
} put_header_t;

typedef struct bundle_entry {
  put_header_t put;
  uint64_t len;
} bundle_entry_t;

typedef struct signal_entry {
  uint64_t base;
  uint64_t sig_off;
  int64_t value;
} signal_entry_t;

// ------------------------------------------------------------------------------------------ state
enum { OP_AM_PUT, OP_BUNDLE, OP_FLUSH, OP_SIGNALS };
static const char *const OP_NAMES[] = {"an active-message put", "a bundle of puts", "a flush", "a signal message"};

typedef struct buffer {
  uint8_t *data;
  size_t len, cap;
} buffer_t;

typedef struct op op_t;
struct op {
  op_t *next;  // free list or completion list
  pe_transport_t *t;
  int kind;
  int peer;
  uint32_t count;  // logical operations retired with this one
  uint64_t bytes;  // and their bytes
  ucs_status_t status;
  void *request;
  put_header_t header;  // OP_AM_PUT
  buffer_t payload;     // OP_BUNDLE: its entries; OP_FLUSH: the signals sent once it completes
};

typedef struct peer {
  int id;
  ucp_ep_h ep;
  int same_host;
  pid_t pid;
  int pidfd;      // -1: none
  int check_pid;  // same pid namespace: liveness by pid
  char name[160];
  int failed;    // set once, `error` says why
  int reported;  // progress() or put_signal() has returned the failure
  int closed;    // the endpoint was closed after the failure
  char error[PE_ERR_LEN];
  uint64_t ops, bytes;  // in flight (flow control)
  uint32_t unflushed_ops;  // RMA puts posted since the last flush
  uint64_t unflushed_bytes;
  buffer_t waiting;  // their signals (signal_entry_t)
  op_t *bundle;      // small puts copied into one message, sent by the next progress()
} peer_t;

typedef struct local_region {
  uint8_t *base;
  size_t len;
  ucp_mem_h memh;
  int used;
} local_region_t;

typedef struct remote_region {
  int peer;
  uint64_t base, len;
  ucp_rkey_h rkey;
  int used;
} remote_region_t;

struct pe_transport {
  ucp_context_h context;
  ucp_worker_h worker;
  int efd;       // the worker's event fd, -1 without one
  int ready_fd;  // always readable: returned by wait_fd when the worker cannot be armed
  uint8_t address[PE_BLOB_MAX];
  size_t address_len;
  address_header_t self;
  peer_t **peers;
  int num_peers;
  local_region_t *local;
  int num_local;
  remote_region_t *remote;
  int num_remote;
  op_t *free_ops;
  op_t *done;  // completed requests, filled by UCX callbacks inside ucp_worker_progress
  op_t **chunks;
  int num_chunks;
  uint64_t max_ops, max_bytes, inline_max, bundle_max;
  uint64_t next_liveness_ns;
  pe_transport_stats_t stats;
};

// ------------------------------------------------------------------------------------------ helpers
static int grow(void **items, int *count, size_t size) {
  void *more = realloc(*items, (size_t)(*count + 1) * size);
  if (more == NULL) return -1;
  *items = more;
  memset((uint8_t *)more + (size_t)*count * size, 0, size);
  return (*count)++;
}

static op_t *op_get(pe_transport_t *t) {
  if (t->free_ops == NULL) {
    op_t **chunks = realloc(t->chunks, (size_t)(t->num_chunks + 1) * sizeof *chunks);
    if (chunks == NULL) return NULL;
    t->chunks = chunks;
    op_t *chunk = calloc(OPS_PER_CHUNK, sizeof *chunk);
    if (chunk == NULL) return NULL;
    t->chunks[t->num_chunks++] = chunk;
    for (int i = 0; i < OPS_PER_CHUNK; ++i) {
      chunk[i].next = t->free_ops;
      t->free_ops = &chunk[i];
    }
  }
  op_t *op = t->free_ops;
  t->free_ops = op->next;
  op->next = NULL;
  op->t = t;
  op->status = UCS_OK;
  op->request = NULL;
  op->count = 0;
  op->bytes = 0;
  op->payload.len = 0;
  return op;
}

static void op_put(pe_transport_t *t, op_t *op) {
  op->next = t->free_ops;
  t->free_ops = op;
}

// The operations of `op` are done (or abandoned): they leave the peer's window.
static void retire(pe_transport_t *t, op_t *op) {
  peer_t *p = t->peers[op->peer];
  p->ops -= op->count;
  p->bytes -= op->bytes;
  op_put(t, op);
}

static void fail_peer(peer_t *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// Mark a peer failed (safe inside UCX callbacks: the endpoint is closed later, by progress()).
static void fail_peer(peer_t *p, const char *fmt, ...) {
  if (p->failed) return;
  int n = snprintf(p->error, sizeof p->error, "ucx transport: %s: ", p->name);
  if (n > 0 && (size_t)n < sizeof p->error) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->error + n, sizeof p->error - (size_t)n, fmt, ap);
    va_end(ap);
  }
  p->failed = 1;
}

static int buffer_reserve(buffer_t *b, size_t more) {
  if (b->len + more <= b->cap) return 0;
  size_t cap = b->cap ? b->cap * 2 : 4096;
  while (cap < b->len + more) cap *= 2;
  uint8_t *grown = realloc(b->data, cap);
  if (grown == NULL) return -1;
  b->data = grown;
  b->cap = cap;
  return 0;
}

static int buffer_append(buffer_t *b, const void *item, size_t len) {
  if (buffer_reserve(b, len) != 0) return -1;
  memcpy(b->data + b->len, item, len);
  b->len += len;
  return 0;
}

static void on_request_done(void *request, ucs_status_t status, void *user_data) {
  op_t *op = user_data;
  op->status = status;
  op->request = request;
  op->next = op->t->done;
  op->t->done = op;
}

static void on_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status) {
  (void)ep;
  fail_peer(arg, "UCX reports the peer failed (%s)", ucs_status_string(status));
}

static ucp_request_param_t send_param(op_t *op, uint32_t flags) {
  ucp_request_param_t param = {.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
                               .cb.send = on_request_done, .user_data = op};
  if (flags) {
    param.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = flags;
  }
  return param;
}

// ------------------------------------------------------------------------------------- receiving
static local_region_t *find_local(pe_transport_t *t, uint64_t base) {
  for (int i = 0; i < t->num_local; ++i)
    if (t->local[i].used && (uint64_t)(uintptr_t)t->local[i].base == base) return &t->local[i];
  return NULL;
}

static int inside(const local_region_t *r, uint64_t off, uint64_t len) { return off <= r->len && len <= r->len - off; }

// Bytes and their signal: the bytes first, then the signal (release), so that a reader who sees the
// signal sees the bytes. Deliveries to a region not registered here are dropped and counted.
static void deliver(pe_transport_t *t, const put_header_t *h, const void *data, size_t length) {
  local_region_t *r = find_local(t, h->base);
  if (r == NULL || !inside(r, h->dst_off, length) ||
      (h->sig_off != PE_NO_SIGNAL && !inside(r, h->sig_off, sizeof(int64_t)))) {
    t->stats.dropped++;
    return;
  }
  if (length) memcpy(r->base + h->dst_off, data, length);
  if (h->sig_off != PE_NO_SIGNAL) {
    apply_signal(r->base, h->sig_off, h->value);
    t->stats.signals_applied++;
  }
}

static ucs_status_t on_put(void *arg, const void *header, size_t header_length, void *data, size_t length,
                           const ucp_am_recv_param_t *param) {
  pe_transport_t *t = arg;
  t->stats.messages_in++;
  put_header_t h;
  if (header_length != sizeof h || (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
    t->stats.dropped++;
    return UCS_OK;
  }
  memcpy(&h, header, sizeof h);
  deliver(t, &h, data, length);
  return UCS_OK;
}

// Small puts, each applied as on_put does, in the order they were posted.
static ucs_status_t on_bundle(void *arg, const void *header, size_t header_length, void *data, size_t length,
                              const ucp_am_recv_param_t *param) {
  (void)header;
  (void)header_length;
  pe_transport_t *t = arg;
  t->stats.messages_in++;
  if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
    t->stats.dropped++;
    return UCS_OK;
  }
  const uint8_t *at = data, *end = at + length;
  while ((size_t)(end - at) >= sizeof(bundle_entry_t)) {
    bundle_entry_t e;
    memcpy(&e, at, sizeof e);
    at += sizeof e;
    if (e.len > (size_t)(end - at)) {
      t->stats.dropped++;
      break;
    }
    deliver(t, &e.put, at, e.len);
    at += pe_round_up(e.len, 8) < (size_t)(end - at) ? pe_round_up(e.len, 8) : (size_t)(end - at);
  }
  return UCS_OK;
}

// Signals whose bytes were put and flushed before this message was sent.
static ucs_status_t on_signals(void *arg, const void *header, size_t header_length, void *data, size_t length,
                               const ucp_am_recv_param_t *param) {
  (void)header;
  (void)header_length;
  pe_transport_t *t = arg;
  t->stats.messages_in++;
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) || length % sizeof(signal_entry_t)) {
    t->stats.dropped++;
    return UCS_OK;
  }
  for (size_t i = 0; i < length / sizeof(signal_entry_t); ++i) {
    signal_entry_t s;
    memcpy(&s, (const uint8_t *)data + i * sizeof s, sizeof s);
    local_region_t *r = find_local(t, s.base);
    if (r == NULL || !inside(r, s.sig_off, sizeof(int64_t))) {
      t->stats.dropped++;
      continue;
    }
    apply_signal(r->base, s.sig_off, s.value);
    t->stats.signals_applied++;
  }
  return UCS_OK;
}

// ---------------------------------------------------------------------------------------- options
static int parse_options(pe_transport_t *t, const char *options, char *err) {
  t->max_ops = DEFAULT_MAX_OPS;
  t->max_bytes = DEFAULT_MAX_BYTES;
  t->inline_max = DEFAULT_INLINE;
  t->bundle_max = DEFAULT_BUNDLE;
  if (options == NULL || options[0] == '\0') return 0;
  char text[512];
  snprintf(text, sizeof text, "%s", options);
  char *save = NULL;
  for (char *item = strtok_r(text, ",", &save); item != NULL; item = strtok_r(NULL, ",", &save)) {
    char *eq = strchr(item, '=');
    char *end = NULL;
    unsigned long long value = eq ? strtoull(eq + 1, &end, 10) : 0;
    if (eq == NULL || end == eq + 1 || *end != '\0') {
      pe_err(err, "ucx transport: option %s is not key=number", item);
      return -1;
    }
    *eq = '\0';
    if (strcmp(item, "max_ops") == 0 && value > 0) {
      t->max_ops = value;
    } else if (strcmp(item, "max_bytes") == 0 && value > 0) {
      t->max_bytes = value;
    } else if (strcmp(item, "inline") == 0) {
      t->inline_max = value;
    } else if (strcmp(item, "bundle") == 0) {
      t->bundle_max = value;
    } else if (strcmp(item, "rank") == 0 && value <= INT32_MAX) {
      t->self.rank = (int32_t)value;  // names this process in peers' messages
    } else if (strcmp(item, "world") == 0) {
      // the job's size: nothing to do with it here
    } else {
      pe_err(err, "ucx transport: unknown or zero option %s (max_ops, max_bytes, inline, bundle, rank, world)",
             item);
      return -1;
    }
  }
  return 0;
}

// ------------------------------------------------------------------------------------ identity
static void read_identity(address_header_t *h) {
  memset(h, 0, sizeof *h);
  h->magic = ADDRESS_MAGIC;
  h->pid = getpid();
  h->rank = -1;
  struct stat st;
  if (stat("/proc/self/ns/pid", &st) == 0) h->pidns = (uint64_t)st.st_ino;
  int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ssize_t n = read(fd, h->boot_id, sizeof h->boot_id - 1);
    close(fd);
    while (n > 0 && (h->boot_id[n - 1] == '\n' || h->boot_id[n - 1] == '\0')) h->boot_id[--n] = '\0';
  }
  gethostname(h->host, sizeof h->host - 1);
}

static int open_pidfd(pid_t pid) {
#ifdef SYS_pidfd_open
  return (int)syscall(SYS_pidfd_open, pid, 0);
#else
  (void)pid;
  errno = ENOSYS;
  return -1;
#endif
}

// Whether a same-namespace peer's process has ended (zombies included).
static int process_gone(peer_t *p) {
  if (p->pidfd >= 0) {
    struct pollfd fd = {.fd = p->pidfd, .events = POLLIN};
    return poll(&fd, 1, 0) > 0;
  }
  if (kill(p->pid, 0) != 0 && errno == ESRCH) return 1;
  char path[64], stat_line[256];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)p->pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t n = read(fd, stat_line, sizeof stat_line - 1);
  close(fd);
  if (n <= 0) return 0;
  stat_line[n] = '\0';
  const char *paren = strrchr(stat_line, ')');
  return paren != NULL && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X');
}

// --------------------------------------------------------------------------------------- create
static void ucx_destroy(pe_transport_t *t);

static pe_transport_t *ucx_create(const char *options, char *err) {
  pe_transport_t *t = calloc(1, sizeof *t);
  if (t == NULL) {
    pe_err(err, "ucx transport: out of memory");
    return NULL;
  }
  t->efd = -1;
  t->ready_fd = -1;
  read_identity(&t->self);
  if (parse_options(t, options, err) != 0) {
    free(t);
    return NULL;
  }
  ucp_config_t *config = NULL;
  ucs_status_t st = ucp_config_read(NULL, NULL, &config);
  if (st != UCS_OK) {
    pe_err(err, "ucx transport: cannot read the UCX configuration: %s", ucs_status_string(st));
    free(t);
    return NULL;
  }
  ucp_params_t params = {.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME,
                         .features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP,
                         .name = "portep"};
  st = ucp_init(&params, config, &t->context);
  ucp_config_release(config);
  if (st != UCS_OK) {
    pe_err(err, "ucx transport: ucp_init failed: %s (check UCX_TLS)", ucs_status_string(st));
    free(t);
    return NULL;
  }
  ucp_worker_params_t wparams = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                                 .thread_mode = UCS_THREAD_MODE_SERIALIZED};
  st = ucp_worker_create(t->context, &wparams, &t->worker);
  if (st != UCS_OK) {
    pe_err(err, "ucx transport: ucp_worker_create failed: %s", ucs_status_string(st));
    ucp_cleanup(t->context);
    free(t);
    return NULL;
  }
  ucp_worker_attr_t attr = {.field_mask = UCP_WORKER_ATTR_FIELD_ADDRESS};
  st = ucp_worker_query(t->worker, &attr);
  if (st != UCS_OK) {
    pe_err(err, "ucx transport: ucp_worker_query failed: %s", ucs_status_string(st));
    ucx_destroy(t);
    return NULL;
  }
  if (sizeof(address_header_t) + attr.address_length > PE_BLOB_MAX) {
    pe_err(err, "ucx transport: the worker address has %zu bytes, more than the %d an address may have "
           "(restrict UCX_TLS or UCX_NET_DEVICES)", attr.address_length, PE_BLOB_MAX - (int)sizeof(address_header_t));
    ucp_worker_release_address(t->worker, attr.address);
    ucx_destroy(t);
    return NULL;
  }
  t->self.worker_len = (uint32_t)attr.address_length;
  memcpy(t->address, &t->self, sizeof t->self);
  memcpy(t->address + sizeof t->self, attr.address, attr.address_length);
  t->address_len = sizeof t->self + attr.address_length;
  ucp_worker_release_address(t->worker, attr.address);
  if (ucp_worker_get_efd(t->worker, &t->efd) != UCS_OK) t->efd = -1;  // the proxy then wakes periodically
  t->ready_fd = eventfd(1, EFD_CLOEXEC | EFD_NONBLOCK);
  static const struct {
    unsigned id;
    ucp_am_recv_callback_t cb;
  } handlers[] = {{AM_PUT, on_put}, {AM_SIGNALS, on_signals}, {AM_BUNDLE, on_bundle}};
  for (size_t i = 0; i < sizeof handlers / sizeof handlers[0]; ++i) {
    ucp_am_handler_param_t hp = {.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                                               UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG,
                                 .id = handlers[i].id, .flags = UCP_AM_FLAG_WHOLE_MSG, .cb = handlers[i].cb,
                                 .arg = t};
    st = ucp_worker_set_am_recv_handler(t->worker, &hp);
    if (st != UCS_OK) {
      pe_err(err, "ucx transport: cannot set an active message handler: %s", ucs_status_string(st));
      ucx_destroy(t);
      return NULL;
    }
  }
  return t;
}

static int ucx_address(pe_transport_t *t, uint8_t *buf, size_t cap, size_t *len, char *err) {
  if (cap < t->address_len) {
    pe_err(err, "ucx transport: address buffer of %zu bytes is too small (%zu needed)", cap, t->address_len);
    return -1;
  }
  memcpy(buf, t->address, t->address_len);
  *len = t->address_len;
  return 0;
}

// --------------------------------------------------------------------------------------- connect
static int ucx_connect(pe_transport_t *t, const uint8_t *addr, size_t len, char *err) {
  address_header_t h;
  if (len < sizeof h) {
    pe_err(err, "ucx transport: %zu-byte peer address is not a UCX address", len);
    return -1;
  }
  memcpy(&h, addr, sizeof h);
  h.boot_id[sizeof h.boot_id - 1] = '\0';
  h.host[sizeof h.host - 1] = '\0';
  if (h.magic != ADDRESS_MAGIC || h.worker_len != len - sizeof h) {
    pe_err(err, "ucx transport: %zu-byte peer address is not a UCX address", len);
    return -1;
  }
  peer_t *p = calloc(1, sizeof *p);
  if (p == NULL) {
    pe_err(err, "ucx transport: out of memory");
    return -1;
  }
  p->id = t->num_peers;
  p->pid = (pid_t)h.pid;
  p->pidfd = -1;
  p->same_host = h.boot_id[0] != '\0' && strcmp(h.boot_id, t->self.boot_id) == 0;
  p->check_pid = p->same_host && h.pidns == t->self.pidns && p->pid != getpid();
  if (h.rank >= 0)
    snprintf(p->name, sizeof p->name, "rank %d (pid %lld on %s)", (int)h.rank, (long long)h.pid, h.host);
  else
    snprintf(p->name, sizeof p->name, "peer %d (pid %lld on %s)", p->id, (long long)h.pid, h.host);
  if (p->check_pid) {
    p->pidfd = open_pidfd(p->pid);
    if (p->pidfd < 0 && errno == ESRCH) {
      pe_err(err, "ucx transport: %s is not running", p->name);
      free(p);
      return -1;
    }
  }
  ucp_ep_params_t ep = {.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
                        .address = (const ucp_address_t *)(addr + sizeof h),
                        .err_mode = p->same_host ? UCP_ERR_HANDLING_MODE_NONE : UCP_ERR_HANDLING_MODE_PEER};
  // The handler is needed in both modes: without one, UCX 1.21 aborts the process on a transport
  // error (a cma write to a dead process) of a NONE-mode endpoint.
  ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.err_handler.cb = on_ep_error;
  ep.err_handler.arg = p;
  void *peers = t->peers;
  int slot = grow(&peers, &t->num_peers, sizeof *t->peers);
  if (slot >= 0) t->peers = peers;
  ucs_status_t st = slot < 0 ? UCS_ERR_NO_MEMORY : ucp_ep_create(t->worker, &ep, &p->ep);
  if (st != UCS_OK) {
    pe_err(err, "ucx transport: cannot connect to %s: %s", p->name, ucs_status_string(st));
    if (slot >= 0) t->num_peers--;
    if (p->pidfd >= 0) close(p->pidfd);
    free(p);
    return -1;
  }
  t->peers[slot] = p;
  return slot;
}

// ---------------------------------------------------------------------------------------- regions
static int ucx_register(pe_transport_t *t, void *base, size_t len, const char *shm_name, uint8_t *key, size_t cap,
                        size_t *key_len, char *err) {
  (void)shm_name;
  ucp_mem_map_params_t mp = {.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH,
                             .address = base, .length = len};
  ucp_mem_h memh;
  ucs_status_t st = ucp_mem_map(t->context, &mp, &memh);
  if (st != UCS_OK) {
    pe_err(err, "ucx transport: ucp_mem_map of %zu bytes failed: %s", len, ucs_status_string(st));
    return -1;
  }
  void *rkey = NULL;
  size_t rkey_len = 0;
  st = ucp_rkey_pack(t->context, memh, &rkey, &rkey_len);
  if (st != UCS_OK || sizeof(key_header_t) + rkey_len > cap) {
    if (st != UCS_OK)
      pe_err(err, "ucx transport: cannot pack a remote key: %s", ucs_status_string(st));
    else
      pe_err(err, "ucx transport: a remote key of %zu bytes does not fit in %zu", rkey_len, cap);
    if (rkey) ucp_rkey_buffer_release(rkey);
    ucp_mem_unmap(t->context, memh);
    return -1;
  }
  key_header_t h = {.magic = KEY_MAGIC, .rkey_len = (uint32_t)rkey_len, .base = (uint64_t)(uintptr_t)base,
                    .len = len};
  memcpy(key, &h, sizeof h);
  memcpy(key + sizeof h, rkey, rkey_len);
  *key_len = sizeof h + rkey_len;
  ucp_rkey_buffer_release(rkey);
  void *items = t->local;
  int id = grow(&items, &t->num_local, sizeof *t->local);
  if (id < 0) {
    pe_err(err, "ucx transport: out of memory");
    ucp_mem_unmap(t->context, memh);
    return -1;
  }
  t->local = items;
  t->local[id] = (local_region_t){.base = base, .len = len, .memh = memh, .used = 1};
  return id;
}

static void ucx_deregister(pe_transport_t *t, int region) {
  if (region < 0 || region >= t->num_local || !t->local[region].used) return;
  ucp_mem_unmap(t->context, t->local[region].memh);
  t->local[region].used = 0;
}

static int ucx_import(pe_transport_t *t, int peer, const uint8_t *key, size_t len, char *err) {
  key_header_t h;
  if (peer < 0 || peer >= t->num_peers) {
    pe_err(err, "ucx transport: unknown peer %d", peer);
    return -1;
  }
  peer_t *p = t->peers[peer];
  if (len >= sizeof h) memcpy(&h, key, sizeof h);
  if (len < sizeof h || h.magic != KEY_MAGIC || h.rkey_len != len - sizeof h) {
    pe_err(err, "ucx transport: bad region key (%zu bytes) from %s", len, p->name);
    return -1;
  }
  if (p->failed) {
    pe_err(err, "%s", p->error);
    return -1;
  }
  ucp_rkey_h rkey;
  ucs_status_t st = ucp_ep_rkey_unpack(p->ep, key + sizeof h, &rkey);
  if (st != UCS_OK) {
    pe_err(err, "ucx transport: cannot unpack the remote key of %s: %s", p->name, ucs_status_string(st));
    return -1;
  }
  void *items = t->remote;
  int id = grow(&items, &t->num_remote, sizeof *t->remote);
  if (id < 0) {
    pe_err(err, "ucx transport: out of memory");
    ucp_rkey_destroy(rkey);
    return -1;
  }
  t->remote = items;
  t->remote[id] = (remote_region_t){.peer = peer, .base = h.base, .len = h.len, .rkey = rkey, .used = 1};
  return id;
}

// Destroy the remote keys imported on `peer`'s endpoint (released ones included).
static void destroy_rkeys(pe_transport_t *t, int peer) {
  for (int r = 0; r < t->num_remote; ++r) {
    if (t->remote[r].peer == peer && t->remote[r].rkey != NULL) {
      ucp_rkey_destroy(t->remote[r].rkey);
      t->remote[r].rkey = NULL;
    }
  }
}

// A remote key goes once no operation may use it: at once when its peer has nothing in flight,
// else when the peer's endpoint closes.
static void ucx_release(pe_transport_t *t, int remote) {
  if (remote < 0 || remote >= t->num_remote || !t->remote[remote].used) return;
  remote_region_t *r = &t->remote[remote];
  r->used = 0;
  if (r->rkey != NULL && t->peers[r->peer]->ops == 0) {
    ucp_rkey_destroy(r->rkey);
    r->rkey = NULL;
  }
}

// ---------------------------------------------------------------------------------------- posting
static int post_failed(peer_t *p, char *err) {
  pe_err(err, "%s", p->error);
  p->reported = 1;
  return PE_FAILED;
}

// Send the peer's bundle of small puts (one active message).
static void send_bundle(pe_transport_t *t, peer_t *p) {
  op_t *op = p->bundle;
  p->bundle = NULL;
  ucp_request_param_t param = send_param(op, UCP_AM_SEND_FLAG_EAGER);
  void *req = ucp_am_send_nbx(p->ep, AM_BUNDLE, NULL, 0, op->payload.data, op->payload.len, &param);
  if (UCS_PTR_IS_ERR(req)) {
    fail_peer(p, "sending %u puts failed: %s", op->count, ucs_status_string(UCS_PTR_STATUS(req)));
    retire(t, op);
  } else if (req == NULL) {
    retire(t, op);  // sent: the bytes were copied at post time already
  } else {
    op->request = req;
  }
}

// Copy a small put into the peer's bundle.
static int bundle_put(pe_transport_t *t, peer_t *p, const put_header_t *h, const uint8_t *from, uint64_t len,
                      char *err) {
  size_t need = sizeof(bundle_entry_t) + pe_round_up(len, 8);
  if (p->bundle != NULL && p->bundle->payload.len + need > BUNDLE_BYTES) send_bundle(t, p);
  if (p->failed) return post_failed(p, err);
  if (p->bundle == NULL) {
    p->bundle = op_get(t);
    if (p->bundle == NULL) {
      pe_err(err, "ucx transport: out of memory");
      return PE_FAILED;
    }
    p->bundle->kind = OP_BUNDLE;
    p->bundle->peer = p->id;
  }
  op_t *op = p->bundle;
  if (buffer_reserve(&op->payload, need) != 0) {
    pe_err(err, "ucx transport: out of memory");
    return PE_FAILED;
  }
  bundle_entry_t e = {.put = *h, .len = len};
  memcpy(op->payload.data + op->payload.len, &e, sizeof e);
  if (len) memcpy(op->payload.data + op->payload.len + sizeof e, from, len);
  memset(op->payload.data + op->payload.len + sizeof e + len, 0, need - sizeof e - len);
  op->payload.len += need;
  op->count++;
  op->bytes += len;
  p->ops++;
  p->bytes += len;
  return PE_POSTED;
}

// A put with its signal in one active message, sent from the source in place.
static int am_put(pe_transport_t *t, peer_t *p, const put_header_t *h, const uint8_t *from, uint64_t len, char *err) {
  op_t *op = op_get(t);
  if (op == NULL) {
    pe_err(err, "ucx transport: out of memory");
    return PE_FAILED;
  }
  op->kind = OP_AM_PUT;
  op->peer = p->id;
  op->count = 1;
  op->bytes = len;
  op->header = *h;
  ucp_request_param_t param = send_param(op, UCP_AM_SEND_FLAG_EAGER);
  void *req = ucp_am_send_nbx(p->ep, AM_PUT, &op->header, sizeof op->header, from, len, &param);
  if (UCS_PTR_IS_ERR(req)) {
    op_put(t, op);
    fail_peer(p, "sending %llu bytes failed: %s", (unsigned long long)len, ucs_status_string(UCS_PTR_STATUS(req)));
    return post_failed(p, err);
  }
  if (req == NULL) {
    op_put(t, op);  // sent already: the source may be reused
    return PE_POSTED;
  }
  op->request = req;
  p->ops++;
  p->bytes += len;
  return PE_POSTED;
}

// An RMA put; its signal waits for the flush that the next progress() issues.
static int rma_put(peer_t *p, const remote_region_t *dst, const put_header_t *h, const uint8_t *from, uint64_t len,
                   char *err) {
  if (dst->rkey == NULL) return post_failed(p, err);
  ucp_request_param_t param = {.op_attr_mask = 0};
  void *req = ucp_put_nbx(p->ep, from, len, h->base + h->dst_off, dst->rkey, &param);
  if (UCS_PTR_IS_ERR(req)) {
    fail_peer(p, "a put of %llu bytes failed: %s", (unsigned long long)len, ucs_status_string(UCS_PTR_STATUS(req)));
    return post_failed(p, err);
  }
  if (req != NULL) ucp_request_free(req);  // its completion is the flush's
  signal_entry_t s = {.base = h->base, .sig_off = h->sig_off, .value = h->value};
  if (h->sig_off != PE_NO_SIGNAL && buffer_append(&p->waiting, &s, sizeof s) != 0) {
    fail_peer(p, "out of memory");
    return post_failed(p, err);
  }
  p->ops++;
  p->bytes += len;
  p->unflushed_ops++;
  p->unflushed_bytes += len;
  return PE_POSTED;
}

static int ucx_put_signal(pe_transport_t *t, int region, uint64_t src_off, int remote, uint64_t dst_off,
                          uint64_t len, uint64_t sig_off, int64_t value, char *err) {
  if (region < 0 || region >= t->num_local || !t->local[region].used || remote < 0 || remote >= t->num_remote ||
      !t->remote[remote].used) {
    pe_err(err, "ucx transport: unknown region %d or remote region %d", region, remote);
    return PE_FAILED;
  }
  const local_region_t *src = &t->local[region];
  const remote_region_t *dst = &t->remote[remote];
  peer_t *p = t->peers[dst->peer];
  if (src_off > src->len || len > src->len - src_off || dst_off > dst->len || len > dst->len - dst_off ||
      (sig_off != PE_NO_SIGNAL && (sig_off > dst->len || dst->len - sig_off < sizeof(int64_t)))) {
    pe_err(err, "ucx transport: put of %llu bytes from %llu to %llu (signal at %llu) of %s is outside the regions",
           (unsigned long long)len, (unsigned long long)src_off, (unsigned long long)dst_off,
           (unsigned long long)sig_off, p->name);
    return PE_FAILED;
  }
  if (p->failed) return post_failed(p, err);
  if (p->ops >= t->max_ops || (p->ops > 0 && p->bytes + len > t->max_bytes)) {
    t->stats.stalls++;
    return PE_BUSY;
  }
  const uint8_t *from = src->base + src_off;
  const put_header_t h = {.base = dst->base, .dst_off = dst_off, .sig_off = sig_off, .value = value};
  int rc;
  if (t->bundle_max > 0 && len <= t->bundle_max && sizeof(bundle_entry_t) + pe_round_up(len, 8) <= BUNDLE_BYTES)
    rc = bundle_put(t, p, &h, from, len, err);
  else if (len <= t->inline_max)  // signals alone too, when bundles are off
    rc = am_put(t, p, &h, from, len, err);
  else
    rc = rma_put(p, dst, &h, from, len, err);
  if (rc != PE_POSTED) return rc;
  if (len) {
    t->stats.puts++;
    t->stats.bytes += len;
    t->stats.fragments++;
  }
  if (sig_off != PE_NO_SIGNAL) t->stats.signals++;
  return PE_POSTED;
}

// ---------------------------------------------------------------------------------------- progress
// The flush of a batch completed: its puts have landed, send their signals (one message).
static void send_signals(pe_transport_t *t, op_t *op) {
  peer_t *p = t->peers[op->peer];
  if (op->payload.len == 0 || p->failed) {
    retire(t, op);
    return;
  }
  op->kind = OP_SIGNALS;
  ucp_request_param_t param = send_param(op, UCP_AM_SEND_FLAG_EAGER);
  void *req = ucp_am_send_nbx(p->ep, AM_SIGNALS, NULL, 0, op->payload.data, op->payload.len, &param);
  if (UCS_PTR_IS_ERR(req)) {
    fail_peer(p, "sending %zu signals failed: %s", op->payload.len / sizeof(signal_entry_t),
              ucs_status_string(UCS_PTR_STATUS(req)));
    retire(t, op);
  } else if (req == NULL) {
    retire(t, op);
  } else {
    op->request = req;
  }
}

// Flush the puts posted to `p` since its last flush; their signals follow the flush.
static void flush_peer(pe_transport_t *t, peer_t *p) {
  op_t *op = op_get(t);
  if (op == NULL) {
    fail_peer(p, "out of memory");
    return;
  }
  op->kind = OP_FLUSH;
  op->peer = p->id;
  op->count = p->unflushed_ops;
  op->bytes = p->unflushed_bytes;
  buffer_t spare = op->payload;  // hand the signals to the op, keep its old buffer
  op->payload = p->waiting;
  p->waiting = spare;
  p->waiting.len = 0;
  p->unflushed_ops = 0;
  p->unflushed_bytes = 0;
  ucp_request_param_t param = send_param(op, 0);
  void *req = ucp_ep_flush_nbx(p->ep, &param);
  if (UCS_PTR_IS_ERR(req)) {
    fail_peer(p, "a flush failed: %s", ucs_status_string(UCS_PTR_STATUS(req)));
    retire(t, op);
  } else if (req == NULL) {
    send_signals(t, op);
  } else {
    op->request = req;
  }
}

// Close the endpoints of newly failed peers: UCX cancels their requests (the callbacks then retire
// them), and their remote keys go after the endpoint's operations.
static void close_failed(pe_transport_t *t) {
  for (int i = 0; i < t->num_peers; ++i) {
    peer_t *p = t->peers[i];
    if (!p->failed || p->closed) continue;
    p->closed = 1;
    if (p->bundle != NULL) {
      retire(t, p->bundle);
      p->bundle = NULL;
    }
    p->ops -= p->unflushed_ops;
    p->bytes -= p->unflushed_bytes;
    p->unflushed_ops = 0;
    p->unflushed_bytes = 0;
    p->waiting.len = 0;
    ucp_request_param_t param = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS, .flags = UCP_EP_CLOSE_FLAG_FORCE};
    void *req = ucp_ep_close_nbx(p->ep, &param);
    if (req != NULL && !UCS_PTR_IS_ERR(req)) ucp_request_free(req);
    p->ep = NULL;
    destroy_rkeys(t, i);
  }
}

static int handle_completions(pe_transport_t *t) {
  int events = 0;
  while (t->done != NULL) {
    op_t *list = t->done;
    t->done = NULL;
    while (list != NULL) {
      op_t *op = list;
      list = op->next;
      events++;
      if (op->request != NULL) ucp_request_free(op->request);
      op->request = NULL;
      peer_t *p = t->peers[op->peer];
      if (op->status != UCS_OK) fail_peer(p, "%s to it failed: %s", OP_NAMES[op->kind], ucs_status_string(op->status));
      if (op->kind == OP_FLUSH && !p->failed)
        send_signals(t, op);
      else
        retire(t, op);
    }
  }
  return events;
}

static void check_liveness(pe_transport_t *t) {
  uint64_t now = pe_now_ns();
  if (now < t->next_liveness_ns) return;
  t->next_liveness_ns = now + LIVENESS_PERIOD_NS;
  for (int i = 0; i < t->num_peers; ++i) {
    peer_t *p = t->peers[i];
    if (p->check_pid && !p->failed && process_gone(p)) fail_peer(p, "its process exited");
  }
}

static int ucx_progress(pe_transport_t *t, int *failed_peer, char *err) {
  int events = 0;
  for (int i = 0; i < PROGRESS_ROUNDS; ++i) {
    unsigned n = ucp_worker_progress(t->worker);
    if (n == 0) break;
    events += (int)n;
  }
  check_liveness(t);
  close_failed(t);
  events += handle_completions(t);
  for (int i = 0; i < t->num_peers; ++i) {
    peer_t *p = t->peers[i];
    if (!p->failed && p->bundle != NULL) send_bundle(t, p);
    if (!p->failed && p->unflushed_ops) flush_peer(t, p);
  }
  for (int i = 0; i < t->num_peers; ++i) {
    peer_t *p = t->peers[i];
    if (p->failed && !p->reported) {
      p->reported = 1;
      *failed_peer = i;
      pe_err(err, "%s", p->error);
      return PE_FAILED;
    }
  }
  return events;
}

static uint64_t ucx_pending(pe_transport_t *t) {
  uint64_t n = 0;
  for (int i = 0; i < t->num_peers; ++i)
    if (!t->peers[i]->failed) n += t->peers[i]->ops;
  return n;
}

static int ucx_wait_fd(pe_transport_t *t) {
  if (t->efd < 0) return -1;
  for (int i = 0; i < ARM_TRIES; ++i) {
    ucs_status_t st = ucp_worker_arm(t->worker);
    if (st == UCS_OK) return t->efd;
    if (st != UCS_ERR_BUSY) return -1;
    for (int r = 0; r < PROGRESS_ROUNDS && ucp_worker_progress(t->worker); ++r) {
    }
  }
  return t->ready_fd;  // events keep coming: poll() returns at once and the proxy steps again
}

static void ucx_stats(pe_transport_t *t, pe_transport_stats_t *out) { *out = t->stats; }

// ---------------------------------------------------------------------------------------- destroy
static void ucx_destroy(pe_transport_t *t) {
  // Close the endpoints within a deadline: idle ones after a flush (their remote keys first), the
  // others forcibly, cancelling what is still in flight (their remote keys after).
  void **closing = t->num_peers ? calloc((size_t)t->num_peers, sizeof *closing) : NULL;
  for (int i = 0; i < t->num_peers; ++i) {
    peer_t *p = t->peers[i];
    if (p->ep == NULL) continue;
    int force = p->failed || p->ops > 0;
    if (!force) destroy_rkeys(t, i);
    ucp_request_param_t param = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                                 .flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0};
    void *req = ucp_ep_close_nbx(p->ep, &param);
    p->ep = NULL;
    destroy_rkeys(t, i);
    if (req == NULL || UCS_PTR_IS_ERR(req)) continue;
    if (closing != NULL)
      closing[i] = req;
    else
      ucp_request_free(req);
  }
  double deadline = pe_now_s() + CLOSE_TIMEOUT_S;
  pe_backoff_t b;
  pe_backoff_init(&b, 1000);
  for (;;) {
    int open = 0;
    for (int i = 0; closing != NULL && i < t->num_peers; ++i) {
      if (closing[i] == NULL) continue;
      if (ucp_request_check_status(closing[i]) != UCS_INPROGRESS) {
        ucp_request_free(closing[i]);
        closing[i] = NULL;
      } else {
        open++;
      }
    }
    if (open == 0 || pe_now_s() > deadline) break;
    if (ucp_worker_progress(t->worker) == 0) pe_backoff_step(&b);
  }
  for (int i = 0; closing != NULL && i < t->num_peers; ++i)
    if (closing[i] != NULL) ucp_request_free(closing[i]);  // late: the worker's destruction ends it
  free(closing);
  for (int r = 0; r < t->num_local; ++r) ucx_deregister(t, r);
  if (t->worker) ucp_worker_destroy(t->worker);
  if (t->context) ucp_cleanup(t->context);
  if (t->ready_fd >= 0) close(t->ready_fd);
  for (int i = 0; i < t->num_peers; ++i) {
    if (t->peers[i]->pidfd >= 0) close(t->peers[i]->pidfd);
    free(t->peers[i]->waiting.data);
    free(t->peers[i]);
  }
  for (int c = 0; c < t->num_chunks; ++c) {
    for (int i = 0; i < OPS_PER_CHUNK; ++i) free(t->chunks[c][i].payload.data);
    free(t->chunks[c]);
  }
  free(t->chunks);
  free(t->peers);
  free(t->local);
  free(t->remote);
  free(t);
}

static const pe_transport_ops_t UCX_OPS = {
    .name = "ucx",
    .create = ucx_create,
    .address = ucx_address,
    .connect = ucx_connect,
    .register_region = ucx_register,
    .deregister_region = ucx_deregister,
    .import_region = ucx_import,
    .release_region = ucx_release,
    .put_signal = ucx_put_signal,
    .progress = ucx_progress,
    .pending = ucx_pending,
    .wait_fd = ucx_wait_fd,
    .stats = ucx_stats,
    .destroy = ucx_destroy,
};

const pe_transport_ops_t *pe_transport_ucx(void);
const pe_transport_ops_t *pe_transport_ucx(void) { return &UCX_OPS; }
