// The protocol of message fabrics: immediates, fragments, sequence numbers and the receive-side
// signal table (see pe_msgproto.h).
#define _GNU_SOURCE
#include "pe_msgproto.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "pe_transport.h"
#include "pe_window.h"

#define IMM_KIND_SHIFT 31
#define IMM_COUNTER_SHIFT 15
#define IMM_SEQ_SHIFT 8
#define IMM_COUNTER_MASK (PE_IMM_COUNTERS - 1)
#define IMM_SEQ_MASK (PE_IMM_SEQ_MOD - 1)

// ---------------------------------------------------------------------------------- immediates
int pe_imm_encode(int kind, uint32_t counter, uint32_t seq, int32_t value, uint32_t *imm, char *err) {
  if (kind != PE_IMM_DATA && kind != PE_IMM_SIGNAL) {
    pe_err(err, "immediate: unknown kind %d", kind);
    return -1;
  }
  if (counter >= PE_IMM_COUNTERS) {
    pe_err(err, "immediate: counter %u does not fit (0..%u)", counter, PE_IMM_COUNTERS - 1);
    return -1;
  }
  if (value < PE_IMM_VALUE_MIN || value > PE_IMM_VALUE_MAX || (kind == PE_IMM_DATA && value != 0)) {
    pe_err(err, "immediate: value %d does not fit (%s)", value, kind == PE_IMM_DATA ? "DATA carries none" : "-128..127");
    return -1;
  }
  *imm = ((uint32_t)kind << IMM_KIND_SHIFT) | (counter << IMM_COUNTER_SHIFT) | ((seq & IMM_SEQ_MASK) << IMM_SEQ_SHIFT) |
         (uint32_t)(uint8_t)(int8_t)value;
  return 0;
}

void pe_imm_decode(uint32_t imm, int *kind, uint32_t *counter, uint32_t *seq, int32_t *value) {
  *kind = (int)(imm >> IMM_KIND_SHIFT);
  *counter = (imm >> IMM_COUNTER_SHIFT) & IMM_COUNTER_MASK;
  *seq = (imm >> IMM_SEQ_SHIFT) & IMM_SEQ_MASK;
  *value = (int32_t)(int8_t)(uint8_t)(imm & 0xffu);
}

int pe_msg_split_value(int64_t value, int32_t pieces[PE_MSG_MAX_PIECES], char *err) {
  const int64_t step = value < 0 ? PE_IMM_VALUE_MIN : PE_IMM_VALUE_MAX;
  const int64_t max = step * PE_MSG_MAX_PIECES;
  if ((value > 0 && value > max) || (value < 0 && value < max)) {
    pe_err(err, "signal value %lld does not fit %d immediates (%d..%d)", (long long)value, PE_MSG_MAX_PIECES,
           PE_IMM_VALUE_MIN * PE_MSG_MAX_PIECES, PE_IMM_VALUE_MAX * PE_MSG_MAX_PIECES);
    return -1;
  }
  int n = 0;
  int64_t left = value;
  do {
    int64_t piece = (value < 0 ? left < step : left > step) ? step : left;
    pieces[n++] = (int32_t)piece;
    left -= piece;
  } while (left != 0);
  return n;
}

// -------------------------------------------------------------------------------- region keys
int pe_msg_key_write(const pe_msg_key_t *k, uint8_t *buf, size_t cap, size_t *len, char *err) {
  if (cap < sizeof *k) {
    pe_err(err, "region key buffer of %zu bytes is too small (%zu needed)", cap, sizeof *k);
    return -1;
  }
  pe_msg_key_t out = *k;
  out.magic = PE_MSG_KEY_MAGIC;
  memcpy(buf, &out, sizeof out);
  *len = sizeof out;
  return 0;
}

int pe_msg_key_read(pe_msg_key_t *k, const uint8_t *buf, size_t len, char *err) {
  if (len != sizeof *k) {
    pe_err(err, "a region key has %zu bytes, got %zu (a key of another transport?)", sizeof *k, len);
    return -1;
  }
  memcpy(k, buf, sizeof *k);
  if (k->magic != PE_MSG_KEY_MAGIC || (uint64_t)k->first_counter + k->num_counters > PE_IMM_COUNTERS) {
    pe_err(err, "not a region key of a message fabric (magic 0x%08x)", k->magic);
    return -1;
  }
  return 0;
}

int pe_msg_remotes_add(pe_msg_remotes_t *r, int peer, const pe_msg_key_t *key) {
  pe_msg_remote_t *more = realloc(r->items, (size_t)(r->count + 1) * sizeof *more);
  if (more == NULL) return -1;
  r->items = more;
  r->items[r->count] = (pe_msg_remote_t){.peer = peer, .used = 1, .key = *key};
  return r->count++;
}

void pe_msg_remotes_release(pe_msg_remotes_t *r, int index) {
  if (index >= 0 && index < r->count) r->items[index].used = 0;
}

const pe_msg_remote_t *pe_msg_remotes_get(const pe_msg_remotes_t *r, int index) {
  return index >= 0 && index < r->count && r->items[index].used ? &r->items[index] : NULL;
}

void pe_msg_remotes_free(pe_msg_remotes_t *r) {
  free(r->items);
  r->items = NULL;
  r->count = 0;
}

int pe_msg_key_counter(const pe_msg_key_t *k, uint64_t sig_off, uint32_t *counter, char *err) {
  if (sig_off < k->sig_base || (sig_off - k->sig_base) % sizeof(int64_t) ||
      (sig_off - k->sig_base) / sizeof(int64_t) >= k->num_counters) {
    pe_err(err, "signal offset %llu is not one of the %u counters of the remote region (at %llu)",
           (unsigned long long)sig_off, k->num_counters, (unsigned long long)k->sig_base);
    return -1;
  }
  *counter = k->first_counter + (uint32_t)((sig_off - k->sig_base) / sizeof(int64_t));
  return 0;
}

// ------------------------------------------------------------------------------- sending side
int pe_msg_put_init(pe_msg_put_t *p, uint32_t region, uint64_t src_off, uint64_t dst_off, uint64_t len,
                    uint64_t frag, int signal, uint32_t counter, int64_t value, char *err) {
  memset(p, 0, sizeof *p);
  if (frag == 0 || frag > PE_MSG_MAX_FRAGMENT) {
    pe_err(err, "fragment size %llu is not in 1..%u", (unsigned long long)frag, PE_MSG_MAX_FRAGMENT);
    return -1;
  }
  p->region = region;
  p->src_off = src_off;
  p->dst_off = dst_off;
  p->len = len;
  p->frag = frag;
  if (signal) {
    if (counter >= PE_IMM_COUNTERS) {
      pe_err(err, "counter %u does not fit an immediate", counter);
      return -1;
    }
    int n = pe_msg_split_value(value, p->pieces, err);
    if (n < 0) return -1;
    p->npieces = n;
    p->counter = counter;
    p->tagged = len > 0;
  }
  return 0;
}

uint64_t pe_msg_put_fragments(const pe_msg_put_t *p) { return (p->len + p->frag - 1) / p->frag; }

uint64_t pe_msg_put_messages(const pe_msg_put_t *p) { return pe_msg_put_fragments(p) + (uint64_t)p->npieces; }

int pe_msg_put_peek(const pe_msg_put_t *p, uint64_t src, pe_msg_hdr_t *h, uint64_t *src_off) {
  memset(h, 0, sizeof *h);
  h->magic = PE_MSG_MAGIC;
  h->src = src;
  if (p->cut < p->len) {  // bytes first: the signal goes last (on RC it must; elsewhere it is cheaper)
    uint64_t n = p->len - p->cut < p->frag ? p->len - p->cut : p->frag;
    h->kind = p->tagged ? PE_MSG_DATA : PE_MSG_PUT;
    h->region = p->region;
    h->dst_off = p->dst_off + p->cut;
    h->len = (uint32_t)n;
    if (p->tagged) pe_imm_encode(PE_IMM_DATA, p->counter, p->seq, 0, &h->imm, NULL);
    *src_off = p->src_off + p->cut;
    return 1;
  }
  if (p->next_piece < p->npieces) {
    h->kind = PE_MSG_SIGNAL;
    h->region = p->region;
    h->need = p->next_piece == 0 ? p->len : 0;
    h->imm = pe_msg_put_signal_imm(p, p->next_piece);
    *src_off = 0;
    return 1;
  }
  return 0;
}

uint32_t pe_msg_put_signal_imm(const pe_msg_put_t *p, int piece) {
  uint32_t imm = 0;
  pe_imm_encode(PE_IMM_SIGNAL, p->counter, p->seq + (uint32_t)piece, p->pieces[piece], &imm, NULL);
  return imm;
}

void pe_msg_put_advance(pe_msg_put_t *p) {
  if (p->cut < p->len) {
    p->cut += p->len - p->cut < p->frag ? p->len - p->cut : p->frag;
  } else if (p->next_piece < p->npieces) {
    p->next_piece++;
  }
}

// A small open-addressing map from 64-bit keys to 32-bit values (indices), never shrunk.
#define MAP_EMPTY UINT32_MAX

typedef struct u64map {
  uint64_t *keys;
  uint32_t *vals;
  uint32_t cap, count;
} u64map_t;

static uint64_t mix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

static uint32_t *map_find(const u64map_t *m, uint64_t key) {
  if (m->cap == 0) return NULL;
  for (uint32_t i = (uint32_t)mix64(key) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
    if (m->vals[i] == MAP_EMPTY) return NULL;
    if (m->keys[i] == key) return &m->vals[i];
  }
}

static int map_put(u64map_t *m, uint64_t key, uint32_t val);

static int map_grow(u64map_t *m) {
  u64map_t bigger = {.cap = m->cap ? m->cap * 2 : 64};
  bigger.keys = malloc(bigger.cap * sizeof *bigger.keys);
  bigger.vals = malloc(bigger.cap * sizeof *bigger.vals);
  if (bigger.keys == NULL || bigger.vals == NULL) {
    free(bigger.keys);
    free(bigger.vals);
    return -1;
  }
  memset(bigger.vals, 0xff, bigger.cap * sizeof *bigger.vals);
  for (uint32_t i = 0; i < m->cap; ++i)
    if (m->vals[i] != MAP_EMPTY) map_put(&bigger, m->keys[i], m->vals[i]);
  free(m->keys);
  free(m->vals);
  *m = bigger;
  return 0;
}

static int map_put(u64map_t *m, uint64_t key, uint32_t val) {
  if ((m->count + 1) * 2 > m->cap && map_grow(m) != 0) return -1;
  uint32_t i = (uint32_t)mix64(key) & (m->cap - 1);
  while (m->vals[i] != MAP_EMPTY && m->keys[i] != key) i = (i + 1) & (m->cap - 1);
  if (m->vals[i] == MAP_EMPTY) m->count++;
  m->keys[i] = key;
  m->vals[i] = val;
  return 0;
}

static void map_free(u64map_t *m) {
  free(m->keys);
  free(m->vals);
  memset(m, 0, sizeof *m);
}

typedef struct seq_entry {
  uint32_t region;
  uint32_t next;
} seq_entry_t;

struct pe_msg_seqs {
  u64map_t map;
  seq_entry_t *items;
  uint32_t count, cap;
};

pe_msg_seqs_t *pe_msg_seqs_create(void) { return calloc(1, sizeof(pe_msg_seqs_t)); }

void pe_msg_seqs_destroy(pe_msg_seqs_t *s) {
  if (s == NULL) return;
  map_free(&s->map);
  free(s->items);
  free(s);
}

int pe_msg_seqs_take(pe_msg_seqs_t *s, uint32_t peer, uint32_t region, uint32_t counter, uint32_t n, uint32_t *first) {
  const uint64_t key = (uint64_t)peer << 32 | counter;
  uint32_t *index = map_find(&s->map, key);
  if (index == NULL) {
    if (s->count == s->cap) {
      uint32_t cap = s->cap ? s->cap * 2 : 64;
      seq_entry_t *more = realloc(s->items, cap * sizeof *more);
      if (more == NULL) return -1;
      s->items = more;
      s->cap = cap;
    }
    if (map_put(&s->map, key, s->count) != 0) return -1;
    s->items[s->count] = (seq_entry_t){.region = region, .next = 0};
    index = map_find(&s->map, key);
    *index = s->count++;
  }
  seq_entry_t *e = &s->items[*index];
  if (e->region != region) *e = (seq_entry_t){.region = region, .next = 0};
  *first = e->next;
  e->next += n;
  return 0;
}

// ---------------------------------------------------------------------------------- queues
int pe_msg_queue_init(pe_msg_queue_t *q, uint32_t max_posts, uint64_t max_bytes) {
  memset(q, 0, sizeof *q);
  uint32_t cap = 1;
  while (cap < max_posts && cap < (1u << 30)) cap <<= 1;
  q->items = calloc(cap, sizeof *q->items);
  if (q->items == NULL) return -1;
  q->cap = cap;
  q->max_bytes = max_bytes;
  return 0;
}

void pe_msg_queue_free(pe_msg_queue_t *q) {
  free(q->items);
  memset(q, 0, sizeof *q);
}

int pe_msg_queue_has_room(const pe_msg_queue_t *q, uint64_t bytes) {
  if (q->count == q->cap) return 0;
  return q->count == 0 || q->bytes + bytes <= q->max_bytes;
}

void pe_msg_queue_push(pe_msg_queue_t *q, const pe_msg_put_t *p) {
  q->items[(q->head + q->count) & (q->cap - 1)] = *p;
  q->count++;
  q->bytes += p->len;
  q->messages += pe_msg_put_messages(p);
}

void pe_msg_queue_sent_one(pe_msg_queue_t *q) {
  pe_msg_put_t *p = pe_msg_queue_front(q);
  if (p == NULL) return;
  pe_msg_put_advance(p);
  q->messages--;
  if (pe_msg_put_done(p)) {
    q->bytes -= p->len;
    q->head++;
    q->count--;
  }
}

void pe_msg_queue_clear(pe_msg_queue_t *q) {
  q->head = q->count = 0;
  q->bytes = q->messages = 0;
}

// ------------------------------------------------------------------------------ receiving side
typedef struct pend {
  uint32_t seq;       // full sequence number
  int has_signal;
  int32_t value;
  uint64_t landed;    // tagged bytes that arrived
  uint64_t need;      // bytes the signal guards (once it arrived)
} pend_t;

typedef struct entry {
  uint64_t key;       // source index << 32 | counter
  uint32_t expect;    // next sequence number to apply
  uint32_t npend, cap;
  pend_t *pend;
} entry_t;

typedef struct region {
  uint8_t *base;
  uint64_t len, sig_base;
  uint32_t first, count;
  int used;
} region_t;

struct pe_msg_table {
  pe_msg_apply_fn apply;
  void *ctx;
  u64map_t sources;  // source id -> source index
  uint32_t nsources;
  u64map_t index;    // entry key -> entry
  entry_t *entries;
  uint32_t nentries, cap;
  region_t *regions;
  uint32_t nregions;
  uint32_t cursor;   // where the next counter range is looked for
};

static void default_apply(void *ctx, void *base, uint64_t sig_off, int64_t value) {
  (void)ctx;
  pe_signal_apply(base, sig_off, value);
}

pe_msg_table_t *pe_msg_table_create(pe_msg_apply_fn apply, void *ctx) {
  pe_msg_table_t *t = calloc(1, sizeof *t);
  if (t == NULL) return NULL;
  t->apply = apply ? apply : default_apply;
  t->ctx = ctx;
  return t;
}

void pe_msg_table_destroy(pe_msg_table_t *t) {
  if (t == NULL) return;
  for (uint32_t i = 0; i < t->nentries; ++i) free(t->entries[i].pend);
  free(t->entries);
  free(t->regions);
  map_free(&t->sources);
  map_free(&t->index);
  free(t);
}

static int range_free(const pe_msg_table_t *t, uint32_t start, uint32_t count) {
  if ((uint64_t)start + count > PE_IMM_COUNTERS) return 0;
  for (uint32_t i = 0; i < t->nregions; ++i) {
    const region_t *r = &t->regions[i];
    if (r->used && r->count && start < r->first + r->count && r->first < start + count) return 0;
  }
  return 1;
}

int pe_msg_table_add_region(pe_msg_table_t *t, void *base, uint64_t len, uint64_t sig_base, uint32_t num_counters,
                            uint32_t *region, uint32_t *first, char *err) {
  uint32_t start = 0;
  if (num_counters) {
    // Next fit from the cursor, so that a removed region's counters are reused as late as possible
    // (a message still in flight toward them then finds no region, not another one's counters).
    int found = 0;
    uint64_t best = UINT64_MAX;
    for (uint32_t i = 0; i < t->nregions + 2; ++i) {
      uint32_t cand;
      if (i == t->nregions) {
        cand = t->cursor;
      } else if (i == t->nregions + 1) {
        cand = 0;
      } else if (t->regions[i].used) {
        cand = t->regions[i].first + t->regions[i].count;
      } else {
        continue;
      }
      uint64_t dist = ((uint64_t)cand + PE_IMM_COUNTERS - t->cursor) % PE_IMM_COUNTERS;
      if (dist < best && range_free(t, cand, num_counters)) {
        best = dist;
        start = cand;
        found = 1;
      }
    }
    if (!found) {
      pe_err(err, "no room for %u more signal counters (a transport numbers at most %u across its regions)",
             num_counters, PE_IMM_COUNTERS);
      return -1;
    }
  }
  region_t *more = realloc(t->regions, (t->nregions + 1) * sizeof *more);
  if (more == NULL) {
    pe_err(err, "out of memory");
    return -1;
  }
  t->regions = more;
  t->regions[t->nregions] = (region_t){.base = base, .len = len, .sig_base = sig_base, .first = start,
                                       .count = num_counters, .used = 1};
  if (num_counters) t->cursor = (start + num_counters) % PE_IMM_COUNTERS;
  *region = t->nregions++;
  *first = start;
  return 0;
}

void pe_msg_table_remove_region(pe_msg_table_t *t, uint32_t region) {
  if (region >= t->nregions || !t->regions[region].used) return;
  region_t *r = &t->regions[region];
  r->used = 0;
  for (uint32_t i = 0; i < t->nentries; ++i) {
    entry_t *e = &t->entries[i];
    uint32_t counter = (uint32_t)(e->key & 0xffffffffu);
    if (counter < r->first || counter >= r->first + r->count) continue;
    e->npend = 0;
    e->expect = 0;
  }
}

void *pe_msg_table_region(pe_msg_table_t *t, uint32_t region, uint64_t *len) {
  if (region >= t->nregions || !t->regions[region].used) return NULL;
  if (len) *len = t->regions[region].len;
  return t->regions[region].base;
}

uint32_t pe_msg_window_counters(const void *base, uint64_t len, uint64_t *sig_base) {
  const pe_window_control_t *c = base;
  *sig_base = pe_window_signals_offset();
  if (base == NULL || len < PE_PAGE || pe_load_acquire_u32(&c->magic) != PE_WINDOW_MAGIC) return 0;
  uint64_t n = c->num_signals;
  if (*sig_base + n * sizeof(int64_t) > len) return 0;
  return n > PE_IMM_COUNTERS ? PE_IMM_COUNTERS : (uint32_t)n;
}

static region_t *region_of_counter(pe_msg_table_t *t, uint32_t counter) {
  for (uint32_t i = 0; i < t->nregions; ++i) {
    region_t *r = &t->regions[i];
    if (r->used && counter >= r->first && counter - r->first < r->count) return r;
  }
  return NULL;
}

static entry_t *entry_of(pe_msg_table_t *t, uint64_t src, uint32_t counter) {
  uint32_t *s = map_find(&t->sources, src);
  if (s == NULL) {
    if (map_put(&t->sources, src, t->nsources) != 0) return NULL;
    s = map_find(&t->sources, src);
    t->nsources++;
  }
  const uint64_t key = (uint64_t)*s << 32 | counter;
  uint32_t *i = map_find(&t->index, key);
  if (i != NULL) return &t->entries[*i];
  if (t->nentries == t->cap) {
    uint32_t cap = t->cap ? t->cap * 2 : 64;
    entry_t *more = realloc(t->entries, cap * sizeof *more);
    if (more == NULL) return NULL;
    t->entries = more;
    t->cap = cap;
  }
  if (map_put(&t->index, key, t->nentries) != 0) return NULL;
  entry_t *e = &t->entries[t->nentries++];
  memset(e, 0, sizeof *e);
  e->key = key;
  return e;
}

// The pending record of full sequence number `seq` (created when absent); NULL when out of memory.
static pend_t *pend_of(entry_t *e, uint32_t seq) {
  for (uint32_t k = 0; k < e->npend; ++k)
    if (e->pend[k].seq == seq) return &e->pend[k];
  if (e->npend == e->cap) {
    uint32_t cap = e->cap ? e->cap * 2 : 2;
    pend_t *more = realloc(e->pend, cap * sizeof *more);
    if (more == NULL) return NULL;
    e->pend = more;
    e->cap = cap;
  }
  pend_t *p = &e->pend[e->npend++];
  memset(p, 0, sizeof *p);
  p->seq = seq;
  return p;
}

// Apply, in sequence order, every signal of `e` whose bytes have all landed.
static int apply_ready(pe_msg_table_t *t, entry_t *e, uint32_t counter) {
  int applied = 0;
  for (;;) {
    uint32_t k = 0;
    while (k < e->npend && e->pend[k].seq != e->expect) ++k;
    if (k == e->npend || !e->pend[k].has_signal || e->pend[k].landed < e->pend[k].need) break;
    const int64_t value = e->pend[k].value;
    e->pend[k] = e->pend[--e->npend];
    e->expect++;
    region_t *r = region_of_counter(t, counter);
    if (r != NULL) {
      t->apply(t->ctx, r->base, r->sig_base + (uint64_t)(counter - r->first) * sizeof(int64_t), value);
      applied++;
    }
  }
  return applied;
}

// The full sequence number of a 7-bit one: within PE_IMM_MAX_OUTSTANDING ahead of the next to apply.
static int full_seq(const entry_t *e, uint32_t seq, uint32_t *full) {
  uint32_t delta = (seq - e->expect) & IMM_SEQ_MASK;
  if (delta > PE_IMM_MAX_OUTSTANDING) return -1;
  *full = e->expect + delta;
  return 0;
}

// The pending entry of signal `seq` of (src, counter), for its bytes (`for_bytes`) or for the
// signal itself. Returns 1 with *entry / *pending set, 0 when the counter's region was removed
// (nothing to count), -1 with `err`.
static int pending_of(pe_msg_table_t *t, uint64_t src, uint32_t counter, uint32_t seq, int for_bytes,
                      entry_t **entry, pend_t **pending, char *err) {
  if (region_of_counter(t, counter) == NULL) return 0;
  entry_t *e = entry_of(t, src, counter);
  uint32_t full;
  if (e == NULL) {
    pe_err(err, "signal table: out of memory");
    return -1;
  }
  if (full_seq(e, seq, &full) != 0) {
    if (for_bytes)
      pe_err(err, "bytes of signal %u of counter %u arrived after that signal was applied (next: %u)", seq, counter,
             e->expect & IMM_SEQ_MASK);
    else
      pe_err(err, "signal %u of counter %u arrived after it was applied (next: %u)", seq, counter,
             e->expect & IMM_SEQ_MASK);
    return -1;
  }
  pend_t *p = pend_of(e, full);
  if (p == NULL) {
    pe_err(err, "signal table: out of memory");
    return -1;
  }
  *entry = e;
  *pending = p;
  return 1;
}

int pe_msg_table_data(pe_msg_table_t *t, uint64_t src, uint32_t imm, uint64_t nbytes, char *err) {
  int kind;
  uint32_t counter, seq;
  int32_t value;
  pe_imm_decode(imm, &kind, &counter, &seq, &value);
  if (kind != PE_IMM_DATA || value != 0) {
    pe_err(err, "immediate 0x%08x of a data fragment is not a DATA immediate", imm);
    return -1;
  }
  entry_t *e;
  pend_t *p;
  int found = pending_of(t, src, counter, seq, 1, &e, &p, err);
  if (found <= 0) return found;  // 0: its region was removed, nothing to count
  p->landed += nbytes;
  if (p->has_signal && p->landed > p->need) {
    pe_err(err, "counter %u received %llu bytes for signal %u, which guards %llu", counter,
           (unsigned long long)p->landed, seq, (unsigned long long)p->need);
    return -1;
  }
  return apply_ready(t, e, counter);
}

int pe_msg_table_signal(pe_msg_table_t *t, uint64_t src, uint32_t imm, uint64_t need, char *err) {
  int kind;
  uint32_t counter, seq;
  int32_t value;
  pe_imm_decode(imm, &kind, &counter, &seq, &value);
  if (kind != PE_IMM_SIGNAL) {
    pe_err(err, "immediate 0x%08x of a signal is not a SIGNAL immediate", imm);
    return -1;
  }
  entry_t *e;
  pend_t *p;
  int found = pending_of(t, src, counter, seq, 0, &e, &p, err);
  if (found <= 0) return found;
  if (p->has_signal) {
    pe_err(err, "signal %u of counter %u arrived twice", seq, counter);
    return -1;
  }
  if (p->landed > need) {
    pe_err(err, "counter %u received %llu bytes for signal %u, which guards %llu", counter,
           (unsigned long long)p->landed, seq, (unsigned long long)need);
    return -1;
  }
  p->has_signal = 1;
  p->value = value;
  p->need = need;
  return apply_ready(t, e, counter);
}

int pe_msg_table_deliver(pe_msg_table_t *t, const uint8_t *msg, size_t len, uint64_t *src, int *ignored, char *err) {
  pe_msg_hdr_t h;
  *ignored = 0;
  *src = 0;
  if (len < sizeof h) {
    pe_err(err, "a %zu-byte message is shorter than its header", len);
    return -1;
  }
  memcpy(&h, msg, sizeof h);
  *src = h.src;
  if (h.magic != PE_MSG_MAGIC || h.len != len - sizeof h) {
    pe_err(err, "malformed message (magic 0x%08x, %u payload bytes in %zu)", h.magic, h.len, len);
    return -1;
  }
  if (h.kind == PE_MSG_SIGNAL) {
    if (h.len != 0) {
      pe_err(err, "a signal message carries %u payload bytes", h.len);
      return -1;
    }
    int kind;
    uint32_t counter, seq;
    int32_t value;
    pe_imm_decode(h.imm, &kind, &counter, &seq, &value);
    if (region_of_counter(t, counter) == NULL) {
      *ignored = 1;
      return 0;
    }
    return pe_msg_table_signal(t, h.src, h.imm, h.need, err);
  }
  if (h.kind != PE_MSG_PUT && h.kind != PE_MSG_DATA) {
    pe_err(err, "message of unknown kind %u", h.kind);
    return -1;
  }
  if (h.region >= t->nregions) {
    pe_err(err, "message for region %u, which was never registered here", h.region);
    return -1;
  }
  region_t *r = &t->regions[h.region];
  if (!r->used) {
    *ignored = 1;
    return 0;
  }
  if (h.dst_off > r->len || h.len > r->len - h.dst_off) {
    pe_err(err, "%u bytes at offset %llu fall outside the %llu-byte region %u", h.len, (unsigned long long)h.dst_off,
           (unsigned long long)r->len, h.region);
    return -1;
  }
  if (h.kind == PE_MSG_DATA) {
    int kind;
    uint32_t counter, seq;
    int32_t value;
    pe_imm_decode(h.imm, &kind, &counter, &seq, &value);
    if (counter < r->first || counter - r->first >= r->count) {
      pe_err(err, "bytes for region %u are tagged with counter %u of another region", h.region, counter);
      return -1;
    }
    entry_t *e = entry_of(t, h.src, counter);
    uint32_t full;
    if (e != NULL && full_seq(e, seq, &full) != 0) {  // checked before the bytes overwrite anything
      pe_err(err, "bytes of signal %u of counter %u arrived after that signal was applied (next: %u)", seq, counter,
             e->expect & IMM_SEQ_MASK);
      return -1;
    }
  }
  memcpy(r->base + h.dst_off, msg + sizeof h, h.len);
  return h.kind == PE_MSG_DATA ? pe_msg_table_data(t, h.src, h.imm, h.len, err) : 0;
}


// ------------------------------------------------------------------------------------- options
int pe_opt_get(const char *options, const char *key, char *value, size_t cap) {
  if (options == NULL) return 0;
  const size_t klen = strlen(key);
  const char *p = options;
  while (*p) {
    while (*p == ',' || isspace((unsigned char)*p)) ++p;
    const char *end = strchr(p, ',');
    if (end == NULL) end = p + strlen(p);
    const char *eq = memchr(p, '=', (size_t)(end - p));
    const char *kend = eq ? eq : end;
    while (kend > p && isspace((unsigned char)kend[-1])) --kend;
    if ((size_t)(kend - p) == klen && strncmp(p, key, klen) == 0) {
      const char *v = eq ? eq + 1 : end;
      while (v < end && isspace((unsigned char)*v)) ++v;
      const char *vend = end;
      while (vend > v && isspace((unsigned char)vend[-1])) --vend;
      size_t n = (size_t)(vend - v);
      if (cap) {
        if (n >= cap) n = cap - 1;
        memcpy(value, v, n);
        value[n] = '\0';
      }
      return 1;
    }
    p = end;
  }
  return 0;
}

int pe_opt_u64(const char *options, const char *key, uint64_t *out, const char *who, char *err) {
  char text[64];
  if (!pe_opt_get(options, key, text, sizeof text)) return 0;
  char *end = NULL;
  errno = 0;
  unsigned long long v = strtoull(text, &end, 10);
  if (text[0] == '\0' || text[0] == '-' || *end != '\0' || errno) {
    pe_err(err, "%s: option %s=%s is not a non-negative integer", who, key, text);
    return -1;
  }
  *out = v;
  return 1;
}

int pe_opt_double(const char *options, const char *key, double *out, const char *who, char *err) {
  char text[64];
  if (!pe_opt_get(options, key, text, sizeof text)) return 0;
  char *end = NULL;
  errno = 0;
  double v = strtod(text, &end);
  if (text[0] == '\0' || *end != '\0' || errno || !isfinite(v)) {
    pe_err(err, "%s: option %s=%s is not a number", who, key, text);
    return -1;
  }
  *out = v;
  return 1;
}

int pe_opt_flag(const char *options, const char *key, int *out, const char *who, char *err) {
  char text[16];
  if (!pe_opt_get(options, key, text, sizeof text)) return 0;
  if (!text[0] || !strcmp(text, "1") || !strcmp(text, "true") || !strcmp(text, "yes") || !strcmp(text, "on")) {
    *out = 1;
  } else if (!strcmp(text, "0") || !strcmp(text, "false") || !strcmp(text, "no") || !strcmp(text, "off")) {
    *out = 0;
  } else {
    pe_err(err, "%s: option %s=%s is not a flag (use %s, %s=1 or %s=0)", who, key, text, key, key, key);
    return -1;
  }
  return 1;
}

// -------------------------------------------------------------------------------------- tests
int pe_msgproto_test_plan(const pe_msg_test_put_t *puts, int nputs, uint64_t fragment, pe_msg_test_msg_t *out,
                          int cap, char *err) {
  pe_msg_seqs_t *seqs = pe_msg_seqs_create();
  if (seqs == NULL) {
    pe_err(err, "out of memory");
    return -1;
  }
  int n = 0, rc = 0;
  for (int i = 0; i < nputs && rc == 0; ++i) {
    const pe_msg_test_put_t *u = &puts[i];
    const int signal = u->counter < PE_IMM_COUNTERS;
    pe_msg_put_t p;
    uint32_t first = 0;
    if (pe_msg_put_init(&p, 0, 0, 0, u->len, fragment, signal, signal ? u->counter : 0, u->value, err) != 0 ||
        (signal && pe_msg_seqs_take(seqs, u->src, 0, u->counter, pe_msg_put_seqs(&p), &first) != 0)) {
      rc = -1;
      break;
    }
    pe_msg_put_set_seq(&p, first);
    pe_msg_hdr_t h;
    uint64_t src_off;
    while (pe_msg_put_peek(&p, u->src, &h, &src_off)) {
      if (n == cap) {
        pe_err(err, "more than %d messages", cap);
        rc = -1;
        break;
      }
      pe_msg_test_msg_t *m = &out[n++];
      memset(m, 0, sizeof *m);
      m->src = u->src;
      m->kind = h.kind;
      m->imm = h.imm;
      m->put = (uint32_t)i;
      m->bytes = h.kind == PE_MSG_SIGNAL ? h.need : h.len;
      m->seq = h.kind == PE_MSG_SIGNAL ? p.seq + (uint32_t)p.next_piece : p.seq;
      m->value = h.kind == PE_MSG_SIGNAL ? p.pieces[p.next_piece] : 0;
      pe_msg_put_advance(&p);
    }
  }
  pe_msg_seqs_destroy(seqs);
  return rc == 0 ? n : -1;
}

static void test_apply(void *ctx, void *base, uint64_t sig_off, int64_t value) {
  (void)base;
  ((int64_t *)ctx)[sig_off / sizeof(int64_t)] += value;
}

int pe_msgproto_test_replay(const pe_msg_test_msg_t *msgs, int nmsgs, const int32_t *order, int n,
                            uint32_t num_counters, int64_t *trace, int *failed_at, char *err) {
  *failed_at = -1;
  int64_t *counters = calloc(num_counters ? num_counters : 1, sizeof *counters);
  pe_msg_table_t *t = counters ? pe_msg_table_create(test_apply, counters) : NULL;
  uint32_t region, first;
  static uint8_t dummy;
  if (t == NULL || pe_msg_table_add_region(t, &dummy, (uint64_t)num_counters * sizeof(int64_t), 0, num_counters,
                                           &region, &first, err) != 0) {
    if (t == NULL) pe_err(err, "out of memory");
    pe_msg_table_destroy(t);
    free(counters);
    return -1;
  }
  int rc = 0;
  for (int i = 0; i < n; ++i) {
    if (order[i] < 0 || order[i] >= nmsgs) {
      pe_err(err, "order[%d] = %d is not a message index", i, order[i]);
      rc = -1;
    } else {
      const pe_msg_test_msg_t *m = &msgs[order[i]];
      if (m->kind == PE_MSG_DATA) rc = pe_msg_table_data(t, m->src, m->imm, m->bytes, err) < 0 ? -1 : 0;
      if (m->kind == PE_MSG_SIGNAL) rc = pe_msg_table_signal(t, m->src, m->imm, m->bytes, err) < 0 ? -1 : 0;
    }
    if (rc != 0) {
      *failed_at = i;
      break;
    }
    memcpy(trace + (size_t)i * num_counters, counters, (size_t)num_counters * sizeof *counters);
  }
  pe_msg_table_destroy(t);
  free(counters);
  return rc;
}
