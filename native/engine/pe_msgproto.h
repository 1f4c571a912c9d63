// The protocol every message fabric shares (the software fabric, EFA SRD, verbs RC): how a
// put-with-signal travels as fragments and immediates, and how the receiver applies a signal only
// once every byte it guards has landed, whatever order the fabric delivers in.
//
// Counters. Each receiving transport numbers the int64 signal counters of its registered regions
// in one space of PE_IMM_COUNTERS (65536) counters: a region gets a consecutive range when it is
// registered (its key blob publishes the range), so that a 16-bit counter index names region and
// counter at once, which is what lets the counter travel in an immediate.
//
// Immediate (32 bits, host order here; verbs carries it big-endian):
//
//   bit 31      kind: 0 = DATA (bytes of a signalled put), 1 = SIGNAL
//   bits 30..15 counter index (0..65535)
//   bits 14..8  sequence number of the signal, per (source, counter), modulo 128
//   bits 7..0   SIGNAL: the value to add, int8 (-128..127); DATA: 0
//
// A put-with-signal to counter c of a peer takes the next sequence number s of (peer, c). Its bytes
// travel as fragments of at most `fragment` bytes, each tagged DATA(c, s); the signal travels as
// SIGNAL(c, s, value) together with `need`, the byte count of the put. A value outside -128..127 is
// split into up to PE_MSG_MAX_PIECES signals (s, s+1, ...; only the first one waits for bytes), so
// |value| <= 2032 (positive) or 2048 (negative). A plain put (no signal) travels untagged.
//
// Receiver. Per (source, counter) it keeps the next sequence number to apply and the signals and
// byte counts that arrived ahead of it. Signal s is applied (pe_signal_apply: release add, wake the
// rank) once its `need` bytes tagged (c, s) have landed and every signal before s on (source, c)
// has been applied. So a signal is never visible before its bytes, a lost fragment or signal keeps
// the counter short for good (never a wrong result), and one put's late bytes can never stand in for
// another's.
//
// Limits: 65536 counters per receiving transport, across its regions (a Buffer of W ranks has
// 16 W); at most PE_IMM_MAX_OUTSTANDING (63) signals per (source, counter) posted and not yet
// applied (the stream protocol keeps one put and at most 15 credit signals in flight per counter);
// |value| as above; fragments of at most PE_MSG_MAX_FRAGMENT bytes.
//
// Message fabrics (fabric, EFA) carry a pe_msg_hdr_t before each fragment's payload; verbs RC
// writes the bytes with RDMA and carries only the immediate, on the put's last write (RC delivers
// in order, so the signal needs no byte count there).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "pe_common.h"

#define PE_IMM_COUNTER_BITS 16
#define PE_IMM_SEQ_BITS 7
#define PE_IMM_COUNTERS (1u << PE_IMM_COUNTER_BITS)
#define PE_IMM_SEQ_MOD (1u << PE_IMM_SEQ_BITS)
#define PE_IMM_MAX_OUTSTANDING (PE_IMM_SEQ_MOD / 2 - 1)
#define PE_IMM_VALUE_MIN (-128)
#define PE_IMM_VALUE_MAX 127
#define PE_MSG_MAX_PIECES 16
#define PE_MSG_MAX_FRAGMENT (1u << 30)  // bytes of one message's payload

enum { PE_IMM_DATA = 0, PE_IMM_SIGNAL = 1 };

// ---------------------------------------------------------------------------------- immediates
// 0, or -1 with `err` set when a field does not fit (the sequence number is taken modulo 128).
int pe_imm_encode(int kind, uint32_t counter, uint32_t seq, int32_t value, uint32_t *imm, char *err);
void pe_imm_decode(uint32_t imm, int *kind, uint32_t *counter, uint32_t *seq, int32_t *value);
// Cut `value` into immediate-sized pieces (same sign, summing to it). Returns how many (1..16), or
// -1 with `err` set when it needs more than PE_MSG_MAX_PIECES.
int pe_msg_split_value(int64_t value, int32_t pieces[PE_MSG_MAX_PIECES], char *err);

// ---------------------------------------------------------------------------------- wire format
#define PE_MSG_MAGIC 0x314d4550u  // "PEM1"

enum { PE_MSG_PUT = 1, PE_MSG_DATA = 2, PE_MSG_SIGNAL = 3 };

// What precedes every message of a message fabric (little-endian, as the hosts of one job are).
typedef struct pe_msg_hdr {
  uint32_t magic;
  uint16_t kind;      // PE_MSG_PUT (untagged bytes), PE_MSG_DATA (tagged bytes), PE_MSG_SIGNAL
  uint16_t reserved;
  uint32_t imm;       // DATA, SIGNAL
  uint32_t region;    // PUT, DATA: the receiver's region id
  uint64_t src;       // the sending transport instance
  uint64_t dst_off;   // PUT, DATA: where the payload goes in the region
  uint64_t need;      // SIGNAL: bytes of its put
  uint32_t len;       // payload bytes after the header
  uint32_t reserved2;
} pe_msg_hdr_t;

_Static_assert(sizeof(pe_msg_hdr_t) == 48, "pe_msg_hdr_t is 48 bytes on the wire");

// -------------------------------------------------------------------------------- region keys
#define PE_MSG_KEY_MAGIC 0x594b4550u  // "PEKY"

// The key blob of a registered region (every fabric uses it; addr/rkey only matter to verbs).
typedef struct pe_msg_key {
  uint32_t magic;
  uint32_t region;         // the owner's region id
  uint32_t first_counter;  // the region's counters in the owner's counter space
  uint32_t num_counters;
  uint64_t len;            // region bytes
  uint64_t sig_base;       // offset of counter 0 in the region
  uint64_t addr;           // verbs: virtual address of the region
  uint32_t rkey;           // verbs: remote key
  uint32_t reserved;
} pe_msg_key_t;

int pe_msg_key_write(const pe_msg_key_t *k, uint8_t *buf, size_t cap, size_t *len, char *err);
int pe_msg_key_read(pe_msg_key_t *k, const uint8_t *buf, size_t len, char *err);

// The regions of peers this transport imported: an index per import, kept until released.
typedef struct pe_msg_remote {
  int peer;
  int used;
  pe_msg_key_t key;
} pe_msg_remote_t;

typedef struct pe_msg_remotes {
  pe_msg_remote_t *items;
  int count;
} pe_msg_remotes_t;

// Index of the new remote, or -1 when out of memory.
int pe_msg_remotes_add(pe_msg_remotes_t *r, int peer, const pe_msg_key_t *key);
void pe_msg_remotes_release(pe_msg_remotes_t *r, int index);
// The remote at `index` if it exists and was not released, else NULL.
const pe_msg_remote_t *pe_msg_remotes_get(const pe_msg_remotes_t *r, int index);
void pe_msg_remotes_free(pe_msg_remotes_t *r);
// The counter index of the int64 at `sig_off` of the remote region `k`; -1 with `err` when there is none.
int pe_msg_key_counter(const pe_msg_key_t *k, uint64_t sig_off, uint32_t *counter, char *err);

// ------------------------------------------------------------------------------- sending side
// One post (a put, a put-with-signal or a signal alone) cut into messages, sent one at a time:
// pe_msg_put_peek() describes the next message, pe_msg_put_advance() moves past it once sent.
typedef struct pe_msg_put {
  uint64_t src_off, dst_off, len;
  uint64_t cut;              // bytes already sent
  uint64_t frag;             // largest payload per message
  uint32_t region;           // remote region id
  uint32_t counter, seq;     // of the first signal piece
  int tagged;                // a signal guards the bytes
  int npieces, next_piece;   // signal pieces, and how many were sent
  int32_t pieces[PE_MSG_MAX_PIECES];
  uint64_t cookie;           // the caller's (e.g. the local memory key)
} pe_msg_put_t;

// Plan a post. `src_off`: where the bytes come from, in whatever space the caller reads them (an
// offset, or an address); `region`: the remote region as the caller names it in headers. `signal`:
// 1 with (counter, value); the caller then takes pe_msg_put_seqs() sequence numbers and passes the
// first to pe_msg_put_set_seq() before sending.
int pe_msg_put_init(pe_msg_put_t *p, uint32_t region, uint64_t src_off, uint64_t dst_off, uint64_t len,
                    uint64_t frag, int signal, uint32_t counter, int64_t value, char *err);
static inline uint32_t pe_msg_put_seqs(const pe_msg_put_t *p) { return (uint32_t)p->npieces; }
static inline void pe_msg_put_set_seq(pe_msg_put_t *p, uint32_t seq) { p->seq = seq; }
// Data messages and all messages of the post.
uint64_t pe_msg_put_fragments(const pe_msg_put_t *p);
uint64_t pe_msg_put_messages(const pe_msg_put_t *p);
// 1 with the next message's header (naming `src` as its source) and where its payload comes from
// (src_off's space + the bytes already cut); 0 when everything was sent.
int pe_msg_put_peek(const pe_msg_put_t *p, uint64_t src, pe_msg_hdr_t *h, uint64_t *src_off);
void pe_msg_put_advance(pe_msg_put_t *p);
// The immediate of signal piece `piece` (verbs RC puts the first one on the post's last write).
uint32_t pe_msg_put_signal_imm(const pe_msg_put_t *p, int piece);
static inline int pe_msg_put_done(const pe_msg_put_t *p) { return p->cut >= p->len && p->next_piece >= p->npieces; }

// Sequence numbers of the sending side, per (peer, counter); a counter that now belongs to another
// region of that peer (its owner re-registered) starts again at 0.
typedef struct pe_msg_seqs pe_msg_seqs_t;
pe_msg_seqs_t *pe_msg_seqs_create(void);
void pe_msg_seqs_destroy(pe_msg_seqs_t *s);
// The first of `n` consecutive sequence numbers; -1 when out of memory.
int pe_msg_seqs_take(pe_msg_seqs_t *s, uint32_t peer, uint32_t region, uint32_t counter, uint32_t n, uint32_t *first);

// A FIFO of posts toward one peer, bounded in posts and bytes (one post larger than the byte bound
// is taken when the queue is empty).
typedef struct pe_msg_queue {
  pe_msg_put_t *items;
  uint32_t head, count, cap;  // cap: a power of two, the bound in posts
  uint64_t bytes, max_bytes;
  uint64_t messages;          // messages not sent yet
} pe_msg_queue_t;

int pe_msg_queue_init(pe_msg_queue_t *q, uint32_t max_posts, uint64_t max_bytes);
void pe_msg_queue_free(pe_msg_queue_t *q);
int pe_msg_queue_has_room(const pe_msg_queue_t *q, uint64_t bytes);
void pe_msg_queue_push(pe_msg_queue_t *q, const pe_msg_put_t *p);  // after has_room
static inline pe_msg_put_t *pe_msg_queue_front(pe_msg_queue_t *q) {
  return q->count ? &q->items[q->head & (q->cap - 1)] : NULL;
}
// Call after sending one message of the front post (advances it, pops it when done).
void pe_msg_queue_sent_one(pe_msg_queue_t *q);
void pe_msg_queue_clear(pe_msg_queue_t *q);

// ------------------------------------------------------------------------------ receiving side
// How a signal is applied: pe_signal_apply unless a test installs another function.
typedef void (*pe_msg_apply_fn)(void *ctx, void *base, uint64_t sig_off, int64_t value);

typedef struct pe_msg_table pe_msg_table_t;

pe_msg_table_t *pe_msg_table_create(pe_msg_apply_fn apply, void *ctx);
void pe_msg_table_destroy(pe_msg_table_t *t);
// Register a local region: its id (never reused) and its counters [*first, *first + num_counters)
// (the int64s at base + sig_base + 8 i). num_counters == 0: a region without counters.
int pe_msg_table_add_region(pe_msg_table_t *t, void *base, uint64_t len, uint64_t sig_base, uint32_t num_counters,
                            uint32_t *region, uint32_t *first, char *err);
// Forget a region: later messages for it are ignored, and its counters' state is reset.
void pe_msg_table_remove_region(pe_msg_table_t *t, uint32_t region);
// A region's base and length (NULL when unknown or removed).
void *pe_msg_table_region(pe_msg_table_t *t, uint32_t region, uint64_t *len);
// The counters of a region that is a window of this engine (pe_window.h), or 0.
uint32_t pe_msg_window_counters(const void *base, uint64_t len, uint64_t *sig_base);

// Arrivals from source `src` (any 64-bit id of the sending transport). Each returns the number of
// signals it made applicable (and applied), or -1 with `err` when `src` broke the protocol.
int pe_msg_table_data(pe_msg_table_t *t, uint64_t src, uint32_t imm, uint64_t nbytes, char *err);
int pe_msg_table_signal(pe_msg_table_t *t, uint64_t src, uint32_t imm, uint64_t need, char *err);
// A whole message of a message fabric (header + payload): checks it, copies the payload into its
// region and counts it. *src: the header's source (to name the culprit of an error); *ignored: 1
// when it was for a region removed since.
int pe_msg_table_deliver(pe_msg_table_t *t, const uint8_t *msg, size_t len, uint64_t *src, int *ignored, char *err);

// ------------------------------------------------------------------------------------- options
// The value of `key` in "key=value,flag,..." (a bare flag has the value ""). 1 when present.
int pe_opt_get(const char *options, const char *key, char *value, size_t cap);
// Typed lookups: 0 (absent: *out keeps its default), 1 (set), -1 with `err` (malformed).
int pe_opt_u64(const char *options, const char *key, uint64_t *out, const char *who, char *err);
int pe_opt_double(const char *options, const char *key, double *out, const char *who, char *err);
int pe_opt_flag(const char *options, const char *key, int *out, const char *who, char *err);

// -------------------------------------------------------------------------------------- tests
// A post of the exported test hooks below (tests/test_transport_verbs.py).
typedef struct pe_msg_test_put {
  uint32_t src;      // sending source
  uint32_t counter;  // PE_IMM_COUNTERS or more: a plain put
  uint64_t len;
  int64_t value;
} pe_msg_test_put_t;

// One message as a sender cut it.
typedef struct pe_msg_test_msg {
  uint32_t src;
  uint32_t kind;     // PE_MSG_PUT / PE_MSG_DATA / PE_MSG_SIGNAL
  uint32_t imm;
  uint32_t put;      // index of its post
  uint64_t bytes;    // PUT, DATA: payload bytes; SIGNAL: need
  uint32_t seq;      // full sequence number (DATA, SIGNAL)
  int32_t value;     // SIGNAL: this piece's value
} pe_msg_test_msg_t;

// Cut `nputs` posts into messages as the senders would (sequence numbers per (src, counter)), with
// fragments of `fragment` bytes. Returns the message count, or -1 with `err` (cap too small, ...).
int pe_msgproto_test_plan(const pe_msg_test_put_t *puts, int nputs, uint64_t fragment, pe_msg_test_msg_t *out,
                          int cap, char *err);
// Deliver msgs[order[0]], msgs[order[1]], ... (n of them: a permutation, a subset, repeats) to a
// fresh receiver table with `num_counters` counters, writing the counters after each delivery to
// trace[i * num_counters ...]. Returns 0, or -1 with `err` at the first protocol violation (then
// *failed_at is its index in `order`).
int pe_msgproto_test_replay(const pe_msg_test_msg_t *msgs, int nmsgs, const int32_t *order, int n,
                            uint32_t num_counters, int64_t *trace, int *failed_at, char *err);
