// The slice of the libibverbs / libefa ABI that pe_transport_verbs.c uses, declared here because
// no rdma-core headers may be needed to build portep: the libraries are loaded with dlopen at run
// time, and their absence is an ordinary "transport unavailable" answer.
//
// Followed: linux-rdma/rdma-core v65.0 (commit 691953d8d502f54088f776c5ba2aeed0a5ac945d),
// libibverbs/verbs.h and providers/efa/efadv.h. Only the stable libibverbs 1.1 ABI is used (the
// default symbol versions IBVERBS_1.1 of every function below, unchanged since rdma-core v13):
// the structs are the layouts of that ABI, which rdma-core only ever extends at the end (so a
// struct a library writes is never larger than declared here, ibv_port_attr aside: see there).
// ibv_post_send, ibv_post_recv, ibv_post_srq_recv, ibv_poll_cq and ibv_req_notify_cq are inline
// in verbs.h: calls through `context->ops`, which pe_ibv_* below reproduce.
#pragma once

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

// ------------------------------------------------------------------------------------- enums
enum ibv_mtu { IBV_MTU_256 = 1, IBV_MTU_512 = 2, IBV_MTU_1024 = 3, IBV_MTU_2048 = 4, IBV_MTU_4096 = 5 };

enum ibv_port_state {
  IBV_PORT_NOP = 0,
  IBV_PORT_DOWN = 1,
  IBV_PORT_INIT = 2,
  IBV_PORT_ARMED = 3,
  IBV_PORT_ACTIVE = 4,
  IBV_PORT_ACTIVE_DEFER = 5
};

enum { IBV_LINK_LAYER_UNSPECIFIED, IBV_LINK_LAYER_INFINIBAND, IBV_LINK_LAYER_ETHERNET };

enum ibv_wc_status { IBV_WC_SUCCESS = 0, IBV_WC_WR_FLUSH_ERR = 5 };  // others: ibv_wc_status_str()

enum ibv_wc_opcode {
  IBV_WC_SEND = 0,
  IBV_WC_RDMA_WRITE = 1,
  IBV_WC_RECV = 1 << 7,
  IBV_WC_RECV_RDMA_WITH_IMM = (1 << 7) + 1,
};

enum { IBV_WC_GRH = 1 << 0, IBV_WC_WITH_IMM = 1 << 1 };

enum ibv_access_flags { IBV_ACCESS_LOCAL_WRITE = 1, IBV_ACCESS_REMOTE_WRITE = 1 << 1 };

enum ibv_qp_type { IBV_QPT_RC = 2, IBV_QPT_UC = 3, IBV_QPT_UD = 4, IBV_QPT_DRIVER = 0xff };

enum ibv_qp_state {
  IBV_QPS_RESET,
  IBV_QPS_INIT,
  IBV_QPS_RTR,
  IBV_QPS_RTS,
  IBV_QPS_SQD,
  IBV_QPS_SQE,
  IBV_QPS_ERR,
  IBV_QPS_UNKNOWN
};

enum ibv_mig_state { IBV_MIG_MIGRATED, IBV_MIG_REARM, IBV_MIG_ARMED };

enum ibv_qp_attr_mask {
  IBV_QP_STATE = 1 << 0,
  IBV_QP_CUR_STATE = 1 << 1,
  IBV_QP_EN_SQD_ASYNC_NOTIFY = 1 << 2,
  IBV_QP_ACCESS_FLAGS = 1 << 3,
  IBV_QP_PKEY_INDEX = 1 << 4,
  IBV_QP_PORT = 1 << 5,
  IBV_QP_QKEY = 1 << 6,
  IBV_QP_AV = 1 << 7,
  IBV_QP_PATH_MTU = 1 << 8,
  IBV_QP_TIMEOUT = 1 << 9,
  IBV_QP_RETRY_CNT = 1 << 10,
  IBV_QP_RNR_RETRY = 1 << 11,
  IBV_QP_RQ_PSN = 1 << 12,
  IBV_QP_MAX_QP_RD_ATOMIC = 1 << 13,
  IBV_QP_ALT_PATH = 1 << 14,
  IBV_QP_MIN_RNR_TIMER = 1 << 15,
  IBV_QP_SQ_PSN = 1 << 16,
  IBV_QP_MAX_DEST_RD_ATOMIC = 1 << 17,
  IBV_QP_PATH_MIG_STATE = 1 << 18,
  IBV_QP_CAP = 1 << 19,
  IBV_QP_DEST_QPN = 1 << 20,
};

enum ibv_wr_opcode {
  IBV_WR_RDMA_WRITE,
  IBV_WR_RDMA_WRITE_WITH_IMM,
  IBV_WR_SEND,
  IBV_WR_SEND_WITH_IMM,
};

enum ibv_send_flags { IBV_SEND_FENCE = 1 << 0, IBV_SEND_SIGNALED = 1 << 1, IBV_SEND_INLINE = 1 << 3 };

// ------------------------------------------------------------------------------------ structs
union ibv_gid {
  uint8_t raw[16];
  struct {
    uint64_t subnet_prefix;  // big-endian
    uint64_t interface_id;
  } global;
};

struct ibv_device;  // opaque: ibv_get_device_name() names it
struct ibv_ah;      // opaque
struct ibv_context;
struct ibv_cq;
struct ibv_qp;
struct ibv_srq;
struct ibv_mw;
struct ibv_mw_bind;
struct ibv_send_wr;
struct ibv_recv_wr;
struct ibv_wc;

struct ibv_device_attr {
  char fw_ver[64];
  uint64_t node_guid;
  uint64_t sys_image_guid;
  uint64_t max_mr_size;
  uint64_t page_size_cap;
  uint32_t vendor_id;
  uint32_t vendor_part_id;
  uint32_t hw_ver;
  int max_qp;
  int max_qp_wr;
  unsigned int device_cap_flags;
  int max_sge;
  int max_sge_rd;
  int max_cq;
  int max_cqe;
  int max_mr;
  int max_pd;
  int max_qp_rd_atom;
  int max_ee_rd_atom;
  int max_res_rd_atom;
  int max_qp_init_rd_atom;
  int max_ee_init_rd_atom;
  int atomic_cap;  // enum ibv_atomic_cap
  int max_ee;
  int max_rdd;
  int max_mw;
  int max_raw_ipv6_qp;
  int max_raw_ethy_qp;
  int max_mcast_grp;
  int max_mcast_qp_attach;
  int max_total_mcast_qp_attach;
  int max_ah;
  int max_fmr;
  int max_map_per_fmr;
  int max_srq;
  int max_srq_wr;
  int max_srq_sge;
  uint16_t max_pkeys;
  uint8_t local_ca_ack_delay;
  uint8_t phys_port_cnt;
};

// The exported ibv_query_port (IBVERBS_1.1) fills `struct _compat_ibv_port_attr`, this struct up to
// and including `flags` (libibverbs/verbs.c); the fields after it are those of the inline wrapper
// of newer headers, which memset the struct first: so do callers here.
struct ibv_port_attr {
  int state;       // enum ibv_port_state
  int max_mtu;     // enum ibv_mtu
  int active_mtu;  // enum ibv_mtu
  int gid_tbl_len;
  uint32_t port_cap_flags;
  uint32_t max_msg_sz;
  uint32_t bad_pkey_cntr;
  uint32_t qkey_viol_cntr;
  uint16_t pkey_tbl_len;
  uint16_t lid;
  uint16_t sm_lid;
  uint8_t lmc;
  uint8_t max_vl_num;
  uint8_t sm_sl;
  uint8_t subnet_timeout;
  uint8_t init_type_reply;
  uint8_t active_width;
  uint8_t active_speed;
  uint8_t phys_state;
  uint8_t link_layer;
  uint8_t flags;
  uint16_t port_cap_flags2;
  uint32_t active_speed_ex;
};

struct ibv_context_ops {
  int (*_compat_query_device)(struct ibv_context *context, struct ibv_device_attr *device_attr);
  int (*_compat_query_port)(struct ibv_context *context, uint8_t port_num, void *port_attr);
  void *(*_compat_alloc_pd)(void);
  void *(*_compat_dealloc_pd)(void);
  void *(*_compat_reg_mr)(void);
  void *(*_compat_rereg_mr)(void);
  void *(*_compat_dereg_mr)(void);
  struct ibv_mw *(*alloc_mw)(void *pd, int type);
  int (*bind_mw)(struct ibv_qp *qp, struct ibv_mw *mw, struct ibv_mw_bind *mw_bind);
  int (*dealloc_mw)(struct ibv_mw *mw);
  void *(*_compat_create_cq)(void);
  int (*poll_cq)(struct ibv_cq *cq, int num_entries, struct ibv_wc *wc);
  int (*req_notify_cq)(struct ibv_cq *cq, int solicited_only);
  void *(*_compat_cq_event)(void);
  void *(*_compat_resize_cq)(void);
  void *(*_compat_destroy_cq)(void);
  void *(*_compat_create_srq)(void);
  void *(*_compat_modify_srq)(void);
  void *(*_compat_query_srq)(void);
  void *(*_compat_destroy_srq)(void);
  int (*post_srq_recv)(struct ibv_srq *srq, struct ibv_recv_wr *recv_wr, struct ibv_recv_wr **bad_recv_wr);
  void *(*_compat_create_qp)(void);
  void *(*_compat_query_qp)(void);
  void *(*_compat_modify_qp)(void);
  void *(*_compat_destroy_qp)(void);
  int (*post_send)(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr);
  int (*post_recv)(struct ibv_qp *qp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad_wr);
  void *(*_compat_create_ah)(void);
  void *(*_compat_destroy_ah)(void);
  void *(*_compat_attach_mcast)(void);
  void *(*_compat_detach_mcast)(void);
  void *(*_compat_async_event)(void);
};

struct ibv_context {
  struct ibv_device *device;
  struct ibv_context_ops ops;
  int cmd_fd;
  int async_fd;
  int num_comp_vectors;
  pthread_mutex_t mutex;
  void *abi_compat;
};

struct ibv_pd {
  struct ibv_context *context;
  uint32_t handle;
};

struct ibv_mr {
  struct ibv_context *context;
  struct ibv_pd *pd;
  void *addr;
  size_t length;
  uint32_t handle;
  uint32_t lkey;
  uint32_t rkey;
};

struct ibv_comp_channel {
  struct ibv_context *context;
  int fd;
  int refcnt;
};

struct ibv_cq {
  struct ibv_context *context;
  struct ibv_comp_channel *channel;
  void *cq_context;
  uint32_t handle;
  int cqe;
  pthread_mutex_t mutex;
  pthread_cond_t cond;
  uint32_t comp_events_completed;
  uint32_t async_events_completed;
};

struct ibv_srq_attr {
  uint32_t max_wr;
  uint32_t max_sge;
  uint32_t srq_limit;
};

struct ibv_srq_init_attr {
  void *srq_context;
  struct ibv_srq_attr attr;
};

struct ibv_srq {
  struct ibv_context *context;
  void *srq_context;
  struct ibv_pd *pd;
  uint32_t handle;
  pthread_mutex_t mutex;
  pthread_cond_t cond;
  uint32_t events_completed;
};

struct ibv_qp_cap {
  uint32_t max_send_wr;
  uint32_t max_recv_wr;
  uint32_t max_send_sge;
  uint32_t max_recv_sge;
  uint32_t max_inline_data;
};

struct ibv_qp_init_attr {
  void *qp_context;
  struct ibv_cq *send_cq;
  struct ibv_cq *recv_cq;
  struct ibv_srq *srq;
  struct ibv_qp_cap cap;
  int qp_type;  // enum ibv_qp_type
  int sq_sig_all;
};

struct ibv_qp {
  struct ibv_context *context;
  void *qp_context;
  struct ibv_pd *pd;
  struct ibv_cq *send_cq;
  struct ibv_cq *recv_cq;
  struct ibv_srq *srq;
  uint32_t handle;
  uint32_t qp_num;
  int state;    // enum ibv_qp_state
  int qp_type;  // enum ibv_qp_type
  pthread_mutex_t mutex;
  pthread_cond_t cond;
  uint32_t events_completed;
};

struct ibv_global_route {
  union ibv_gid dgid;
  uint32_t flow_label;
  uint8_t sgid_index;
  uint8_t hop_limit;
  uint8_t traffic_class;
};

struct ibv_ah_attr {
  struct ibv_global_route grh;
  uint16_t dlid;
  uint8_t sl;
  uint8_t src_path_bits;
  uint8_t static_rate;
  uint8_t is_global;
  uint8_t port_num;
};

struct ibv_qp_attr {
  int qp_state;        // enum ibv_qp_state
  int cur_qp_state;    // enum ibv_qp_state
  int path_mtu;        // enum ibv_mtu
  int path_mig_state;  // enum ibv_mig_state
  uint32_t qkey;
  uint32_t rq_psn;
  uint32_t sq_psn;
  uint32_t dest_qp_num;
  unsigned int qp_access_flags;
  struct ibv_qp_cap cap;
  struct ibv_ah_attr ah_attr;
  struct ibv_ah_attr alt_ah_attr;
  uint16_t pkey_index;
  uint16_t alt_pkey_index;
  uint8_t en_sqd_async_notify;
  uint8_t sq_draining;
  uint8_t max_rd_atomic;
  uint8_t max_dest_rd_atomic;
  uint8_t min_rnr_timer;
  uint8_t port_num;
  uint8_t timeout;
  uint8_t retry_cnt;
  uint8_t rnr_retry;
  uint8_t alt_port_num;
  uint8_t alt_timeout;
  uint32_t rate_limit;
};

struct ibv_sge {
  uint64_t addr;
  uint32_t length;
  uint32_t lkey;
};

struct ibv_mw_bind_info {
  void *mr;
  uint64_t addr;
  uint64_t length;
  unsigned int mw_access_flags;
};

struct ibv_send_wr {
  uint64_t wr_id;
  struct ibv_send_wr *next;
  struct ibv_sge *sg_list;
  int num_sge;
  int opcode;  // enum ibv_wr_opcode
  unsigned int send_flags;
  uint32_t imm_data;  // big-endian (union with invalidate_rkey)
  union {
    struct {
      uint64_t remote_addr;
      uint32_t rkey;
    } rdma;
    struct {
      uint64_t remote_addr;
      uint64_t compare_add;
      uint64_t swap;
      uint32_t rkey;
    } atomic;
    struct {
      struct ibv_ah *ah;
      uint32_t remote_qpn;
      uint32_t remote_qkey;
    } ud;
  } wr;
  union {
    struct {
      uint32_t remote_srqn;
    } xrc;
  } qp_type;
  union {
    struct {
      struct ibv_mw *mw;
      uint32_t rkey;
      struct ibv_mw_bind_info bind_info;
    } bind_mw;
    struct {
      void *hdr;
      uint16_t hdr_sz;
      uint16_t mss;
    } tso;
  };
};

struct ibv_recv_wr {
  uint64_t wr_id;
  struct ibv_recv_wr *next;
  struct ibv_sge *sg_list;
  int num_sge;
};

struct ibv_wc {
  uint64_t wr_id;
  int status;  // enum ibv_wc_status
  int opcode;  // enum ibv_wc_opcode
  uint32_t vendor_err;
  uint32_t byte_len;
  uint32_t imm_data;  // big-endian, when wc_flags & IBV_WC_WITH_IMM
  uint32_t qp_num;
  uint32_t src_qp;
  unsigned int wc_flags;
  uint16_t pkey_index;
  uint16_t slid;
  uint8_t sl;
  uint8_t dlid_path_bits;
};

// libefa (providers/efa/efadv.h)
enum {
  EFADV_DEVICE_ATTR_CAPS_RDMA_READ = 1 << 0,
  EFADV_DEVICE_ATTR_CAPS_RNR_RETRY = 1 << 1,
  EFADV_DEVICE_ATTR_CAPS_RDMA_WRITE = 1 << 3,
};

enum { EFADV_QP_DRIVER_TYPE_SRD = 0 };

struct efadv_device_attr {
  uint64_t comp_mask;
  uint32_t max_sq_wr;
  uint32_t max_rq_wr;
  uint16_t max_sq_sge;
  uint16_t max_rq_sge;
  uint16_t inline_buf_size;
  uint16_t inline_buf_size_ex;  // the smallest `inlen` efadv_query_device accepts ends here
  uint32_t device_caps;
  uint32_t max_rdma_size;
};

#if defined(__LP64__)
// Offsets of the LP64 ABI (x86_64, aarch64, ppc64le), as the compilers of rdma-core lay them out.
_Static_assert(offsetof(struct ibv_context, ops) == 8, "ibv_context layout");
_Static_assert(offsetof(struct ibv_context_ops, poll_cq) == 88, "ibv_context_ops layout");
_Static_assert(offsetof(struct ibv_context_ops, post_srq_recv) == 160, "ibv_context_ops layout");
_Static_assert(offsetof(struct ibv_context_ops, post_send) == 200, "ibv_context_ops layout");
_Static_assert(offsetof(struct ibv_context_ops, post_recv) == 208, "ibv_context_ops layout");
_Static_assert(sizeof(struct ibv_context_ops) == 256, "ibv_context_ops layout");
_Static_assert(offsetof(struct ibv_qp, qp_num) == 52, "ibv_qp layout");
_Static_assert(sizeof(struct ibv_send_wr) == 128, "ibv_send_wr layout");
_Static_assert(offsetof(struct ibv_send_wr, wr) == 40, "ibv_send_wr layout");
_Static_assert(sizeof(struct ibv_recv_wr) == 32, "ibv_recv_wr layout");
_Static_assert(sizeof(struct ibv_wc) == 48, "ibv_wc layout");
_Static_assert(sizeof(struct ibv_ah_attr) == 32, "ibv_ah_attr layout");
_Static_assert(offsetof(struct ibv_qp_attr, ah_attr) == 56, "ibv_qp_attr layout");
_Static_assert(sizeof(struct ibv_qp_attr) == 144, "ibv_qp_attr layout");
_Static_assert(offsetof(struct ibv_port_attr, link_layer) == 46, "ibv_port_attr layout");
_Static_assert(offsetof(struct ibv_device_attr, vendor_id) == 96, "ibv_device_attr layout");
_Static_assert(sizeof(struct ibv_device_attr) == 232, "ibv_device_attr layout");
_Static_assert(offsetof(struct efadv_device_attr, device_caps) == 24, "efadv_device_attr layout");
#endif

// ---------------------------------------------------------------------------------- functions
// The functions resolved with dlsym (names as exported, default versions IBVERBS_1.1 / EFA_1.x).
typedef struct pe_ibv_api {
  struct ibv_device **(*get_device_list)(int *num_devices);
  void (*free_device_list)(struct ibv_device **list);
  const char *(*get_device_name)(struct ibv_device *device);
  struct ibv_context *(*open_device)(struct ibv_device *device);
  int (*close_device)(struct ibv_context *context);
  int (*query_device)(struct ibv_context *context, struct ibv_device_attr *attr);
  int (*query_port)(struct ibv_context *context, uint8_t port_num, struct ibv_port_attr *attr);
  int (*query_gid)(struct ibv_context *context, uint8_t port_num, int index, union ibv_gid *gid);
  struct ibv_pd *(*alloc_pd)(struct ibv_context *context);
  int (*dealloc_pd)(struct ibv_pd *pd);
  struct ibv_mr *(*reg_mr)(struct ibv_pd *pd, void *addr, size_t length, int access);
  int (*dereg_mr)(struct ibv_mr *mr);
  struct ibv_comp_channel *(*create_comp_channel)(struct ibv_context *context);
  int (*destroy_comp_channel)(struct ibv_comp_channel *channel);
  struct ibv_cq *(*create_cq)(struct ibv_context *context, int cqe, void *cq_context, struct ibv_comp_channel *channel,
                              int comp_vector);
  int (*destroy_cq)(struct ibv_cq *cq);
  int (*get_cq_event)(struct ibv_comp_channel *channel, struct ibv_cq **cq, void **cq_context);
  void (*ack_cq_events)(struct ibv_cq *cq, unsigned int nevents);
  struct ibv_srq *(*create_srq)(struct ibv_pd *pd, struct ibv_srq_init_attr *attr);
  int (*destroy_srq)(struct ibv_srq *srq);
  struct ibv_qp *(*create_qp)(struct ibv_pd *pd, struct ibv_qp_init_attr *attr);
  int (*modify_qp)(struct ibv_qp *qp, struct ibv_qp_attr *attr, int attr_mask);
  int (*destroy_qp)(struct ibv_qp *qp);
  struct ibv_ah *(*create_ah)(struct ibv_pd *pd, struct ibv_ah_attr *attr);
  int (*destroy_ah)(struct ibv_ah *ah);
  const char *(*wc_status_str)(int status);
  // libefa (NULL when it is not loaded)
  int (*efadv_query_device)(struct ibv_context *context, struct efadv_device_attr *attr, uint32_t inlen);
  struct ibv_qp *(*efadv_create_driver_qp)(struct ibv_pd *pd, struct ibv_qp_init_attr *attr, uint32_t driver_qp_type);
} pe_ibv_api_t;

// verbs.h's inline calls.
static inline int pe_ibv_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad) {
  return qp->context->ops.post_send(qp, wr, bad);
}
static inline int pe_ibv_post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad) {
  return qp->context->ops.post_recv(qp, wr, bad);
}
static inline int pe_ibv_post_srq_recv(struct ibv_srq *srq, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad) {
  return srq->context->ops.post_srq_recv(srq, wr, bad);
}
static inline int pe_ibv_poll_cq(struct ibv_cq *cq, int n, struct ibv_wc *wc) {
  return cq->context->ops.poll_cq(cq, n, wc);
}
static inline int pe_ibv_req_notify_cq(struct ibv_cq *cq, int solicited_only) {
  return cq->context->ops.req_notify_cq(cq, solicited_only);
}
