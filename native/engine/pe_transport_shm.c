// The shm transport: peers on this host map each other's windows, and a put is a copy into the
// peer's window followed by a release add of its signal. It is the default between ranks of one
// host (virtual nodes included): one pass over each byte, no fabric in between.
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pe_transport.h"
#include "pe_window.h"

#define SHM_ADDRESS_MAGIC "PESHM1"

typedef struct shm_region {
  uint8_t *base;
  size_t len;
  pe_shm_t shm;  // imported regions only
  int used;
} shm_region_t;

struct pe_transport {
  char host[256];
  int num_peers;
  shm_region_t *local;
  int num_local;
  shm_region_t *remote;
  int num_remote;
  pe_transport_stats_t stats;
};

static pe_transport_t *shm_create(const char *options, char *err) {
  (void)options;
  pe_transport_t *t = calloc(1, sizeof *t);
  if (t == NULL) {
    pe_err(err, "shm transport: out of memory");
    return NULL;
  }
  gethostname(t->host, sizeof t->host - 1);
  return t;
}

static int shm_address(pe_transport_t *t, uint8_t *buf, size_t cap, size_t *len, char *err) {
  int n = snprintf((char *)buf, cap, "%s:%s", SHM_ADDRESS_MAGIC, t->host);
  if (n < 0 || (size_t)n >= cap) {
    pe_err(err, "shm transport: address buffer too small");
    return -1;
  }
  *len = (size_t)n;
  return 0;
}

static int shm_connect(pe_transport_t *t, const uint8_t *addr, size_t len, char *err) {
  char text[300];
  size_t n = len < sizeof text - 1 ? len : sizeof text - 1;
  memcpy(text, addr, n);
  text[n] = '\0';
  size_t magic = strlen(SHM_ADDRESS_MAGIC);
  if (strncmp(text, SHM_ADDRESS_MAGIC, magic) != 0 || text[magic] != ':') {
    pe_err(err, "shm transport: %zu-byte peer address is not an shm address", len);
    return -1;
  }
  if (strcmp(text + magic + 1, t->host) != 0) {
    pe_err(err, "shm transport: the peer is on host %s, this proxy on %s; shared memory cannot reach it "
           "(choose a network transport with PORTEP_TRANSPORT)", text + magic + 1, t->host);
    return -1;
  }
  return t->num_peers++;
}

static int grow(shm_region_t **items, int *count) {
  shm_region_t *more = realloc(*items, (size_t)(*count + 1) * sizeof **items);
  if (more == NULL) return -1;
  *items = more;
  memset(&more[*count], 0, sizeof **items);
  return (*count)++;
}

static int shm_register(pe_transport_t *t, void *base, size_t len, const char *shm_name, uint8_t *key, size_t cap,
                        size_t *key_len, char *err) {
  if (shm_name == NULL) {
    pe_err(err, "shm transport: can only register shared-memory segments");
    return -1;
  }
  int n = snprintf((char *)key, cap, "%s", shm_name);
  if (n < 0 || (size_t)n >= cap) {
    pe_err(err, "shm transport: key buffer too small");
    return -1;
  }
  int id = grow(&t->local, &t->num_local);
  if (id < 0) {
    pe_err(err, "shm transport: out of memory");
    return -1;
  }
  t->local[id] = (shm_region_t){.base = base, .len = len, .used = 1};
  *key_len = (size_t)n;
  return id;
}

static void shm_deregister(pe_transport_t *t, int region) {
  if (region >= 0 && region < t->num_local) t->local[region].used = 0;
}

static int shm_import(pe_transport_t *t, int peer, const uint8_t *key, size_t len, char *err) {
  char name[PE_SHM_NAME_MAX];
  if (len == 0 || len >= sizeof name) {
    pe_err(err, "shm transport: bad region key (%zu bytes) from peer %d", len, peer);
    return -1;
  }
  memcpy(name, key, len);
  name[len] = '\0';
  int id = grow(&t->remote, &t->num_remote);
  if (id < 0) {
    pe_err(err, "shm transport: out of memory");
    return -1;
  }
  shm_region_t *r = &t->remote[id];
  if (pe_shm_attach(&r->shm, name, err) != 0) return -1;
  r->base = r->shm.base;
  r->len = r->shm.len;
  r->used = 1;
  return id;
}

static void shm_release(pe_transport_t *t, int remote) {
  if (remote < 0 || remote >= t->num_remote || !t->remote[remote].used) return;
  pe_shm_close(&t->remote[remote].shm);
  t->remote[remote].used = 0;
}

static int shm_put_signal(pe_transport_t *t, int region, uint64_t src_off, int remote, uint64_t dst_off,
                          uint64_t len, uint64_t sig_off, int64_t value, char *err) {
  if (region < 0 || region >= t->num_local || !t->local[region].used || remote < 0 || remote >= t->num_remote ||
      !t->remote[remote].used) {
    pe_err(err, "shm transport: unknown region %d or remote region %d", region, remote);
    return PE_FAILED;
  }
  const shm_region_t *src = &t->local[region], *dst = &t->remote[remote];
  if (src_off + len > src->len || dst_off + len > dst->len ||
      (sig_off != PE_NO_SIGNAL && sig_off + sizeof(int64_t) > dst->len)) {
    pe_err(err, "shm transport: put of %llu bytes from %llu to %llu (signal at %llu) is outside the regions",
           (unsigned long long)len, (unsigned long long)src_off, (unsigned long long)dst_off,
           (unsigned long long)sig_off);
    return PE_FAILED;
  }
  if (len) {
    memcpy(dst->base + dst_off, src->base + src_off, len);
    t->stats.puts++;
    t->stats.bytes += len;
    t->stats.fragments++;
  }
  if (sig_off != PE_NO_SIGNAL) {
    pe_signal_apply(dst->base, sig_off, value);  // release: the bytes above are visible first
    t->stats.signals++;
  }
  return PE_POSTED;
}

static int shm_progress(pe_transport_t *t, int *failed_peer, char *err) {
  (void)t;
  (void)failed_peer;
  (void)err;
  return 0;
}

static uint64_t shm_pending(pe_transport_t *t) {
  (void)t;
  return 0;
}

static int shm_wait_fd(pe_transport_t *t) {
  (void)t;
  return -1;
}

static void shm_stats(pe_transport_t *t, pe_transport_stats_t *out) { *out = t->stats; }

static void shm_destroy(pe_transport_t *t) {
  for (int i = 0; i < t->num_remote; ++i) shm_release(t, i);
  free(t->remote);
  free(t->local);
  free(t);
}

static const pe_transport_ops_t SHM_OPS = {
    .name = "shm",
    .create = shm_create,
    .address = shm_address,
    .connect = shm_connect,
    .register_region = shm_register,
    .deregister_region = shm_deregister,
    .import_region = shm_import,
    .release_region = shm_release,
    .put_signal = shm_put_signal,
    .progress = shm_progress,
    .pending = shm_pending,
    .wait_fd = shm_wait_fd,
    .stats = shm_stats,
    .destroy = shm_destroy,
};

const pe_transport_ops_t *pe_transport_shm(void) { return &SHM_OPS; }
