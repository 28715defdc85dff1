/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * common.bpf.h: maps, knobs and the emit routine shared by every TLS program
 * (tls_openssl, tls_gnutls, tls_gotls) and by process.bpf.c.
 *
 * Every object that includes this header defines the same maps by name; the
 * loader (llmspyd/bpf/loader.py) creates them once and makes the other
 * objects reuse them, so one ring buffer and one set of counters serve all.
 *
 * A TLS program only has to find (conn, buf, len, direction):
 *   - stacks whose calls start and return on one thread use
 *     llmspy_call_enter() at entry and llmspy_call_return() at return;
 *   - others (Go) check llmspy_should_trace()/llmspy_is_muted() and call
 *     llmspy_emit() directly once they know how many bytes moved.
 */
#ifndef __LLMSPY_COMMON_BPF_H
#define __LLMSPY_COMMON_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "llmspy.h"

/* connections tracked at once (offsets, socket info, mutes); LRU so that
 * processes that exit without freeing their TLS objects cannot fill them */
#define LLMSPY_MAX_CONNS 65536
/* threads inside a TLS call at once */
#define LLMSPY_MAX_CALLS 16384
/* processes / cgroups with an explicit verdict */
#define LLMSPY_MAX_VERDICTS 16384
/* placeholder sizes: user space sets both before load */
#define LLMSPY_DEFAULT_RING_BYTES (8 << 20)
#define LLMSPY_DEFAULT_SCRATCH_CPUS 64

#define AF_INET 2
#define AF_INET6 10
#define S_IFMT 00170000
#define S_IFSOCK 0140000

/* ---- read-only knobs, set by the loader before load ---- */

/* the daemon's own tgid: never traced */
const volatile __u32 self_tgid = 0;
/* bytes captured per TLS call at most; 0 = unlimited */
const volatile __u32 max_call_bytes = 0;
/* verdict for a process without an entry in pid_verdict / cgroup_verdict */
const volatile __u8 default_verdict = LLMSPY_VERDICT_TRACE;
/* the daemon's pid namespace (st_dev, st_ino of /proc/self/ns/pid) when it is not the initial one, as in a
 * container: ids are then the ones that namespace sees, and tasks outside it are not traced (0, 0: host ids) */
const volatile __u64 pidns_dev = 0;
const volatile __u64 pidns_ino = 0;
/* 0: wake the reader per record (libbpf's default, lowest latency);
 * N: never wake it until N bytes wait in the ring (the reader polls with a timeout) */
const volatile __u32 wakeup_bytes = 0;

/* ---- maps ---- */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, LLMSPY_DEFAULT_RING_BYTES);
} rb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LLMSPY_STAT__MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* one record under construction per CPU; a plain array indexed by CPU
 * because per-CPU map values are capped at 32 KiB, less than one record */
struct llmspy_scratch {
	__u8 raw[LLMSPY_TLS_DATA_SIZE(LLMSPY_CHUNK_MAX)];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LLMSPY_DEFAULT_SCRATCH_CPUS);
	__type(key, __u32);
	__type(value, struct llmspy_scratch);
} scratch SEC(".maps");

struct llmspy_conn_key {
	__u32 tgid;
	__u32 dir; /* enum llmspy_dir; 0 where the key names the whole connection */
	__u64 conn;
};

/* bytes already seen per (process, connection, direction) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LLMSPY_MAX_CONNS * 2);
	__type(key, struct llmspy_conn_key);
	__type(value, __u64);
} offsets SEC(".maps");

/* arguments of a TLS call in flight, saved at entry, keyed by thread id;
 * conn 0 marks a free slot (the thread is not inside a call) */
struct llmspy_call {
	__u64 conn;
	__u64 buf;
	__u64 out_len; /* size_t * of the _ex forms, 0 otherwise */
	__u8 dir;
	__u8 stack;
	__u8 _pad[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LLMSPY_MAX_CALLS);
	__type(key, __u32);
	__type(value, struct llmspy_call);
} calls SEC(".maps");

/* socket of a connection, learnt from the syscalls its TLS calls make */
struct llmspy_sock {
	__s32 fd;
	__u16 family;
	__u16 peer_port;
	__u16 local_port;
	__u8 _pad[6];
	__u8 peer_addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LLMSPY_MAX_CONNS);
	__type(key, struct llmspy_conn_key);
	__type(value, struct llmspy_sock);
} socks SEC(".maps");

/* stacks that write the ciphertext only after the TLS call returned (node: libuv
 * writes it right after SSL_write) teach us the socket through the thread's next
 * write syscall, if it comes soon enough */
#define LLMSPY_PENDING_SOCK_NS (2 * 1000 * 1000)

struct llmspy_pending_sock {
	__u64 conn;
	__u64 ts_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LLMSPY_MAX_CALLS);
	__type(key, __u32);
	__type(value, struct llmspy_pending_sock);
} pending_socks SEC(".maps");

/* filters set by user space: enum llmspy_verdict */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LLMSPY_MAX_VERDICTS);
	__type(key, __u32);
	__type(value, __u8);
} pid_verdict SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LLMSPY_MAX_VERDICTS);
	__type(key, __u64);
	__type(value, __u8);
} cgroup_verdict SEC(".maps");

/* connections user space classified as not interesting; key dir = 0 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LLMSPY_MAX_CONNS);
	__type(key, struct llmspy_conn_key);
	__type(value, __u8);
} muted SEC(".maps");

/* keep the record types in BTF, where tests/unit/test_abi.py checks llmspyd/bpf/abi.py against them */
const struct llmspy_hdr *_abi_hdr __attribute__((unused));
const struct llmspy_tls_data *_abi_tls_data __attribute__((unused));
const struct llmspy_conn_close *_abi_conn_close __attribute__((unused));
const struct llmspy_exec *_abi_exec __attribute__((unused));
const struct llmspy_exit *_abi_exit __attribute__((unused));

/* ---- helpers ---- */

static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		*v += n;
}

/*
 * Wakeup policy for a record of size bytes when avail bytes were waiting
 * before it. With wakeup_bytes set, wake the reader only when the waiting data
 * crosses a multiple of wakeup_bytes: forcing a wakeup on every record while
 * the reader is behind costs each traced call an irq_work (measured: +20 us).
 * Later multiples catch a crossing that concurrent CPUs both missed.
 */
static __always_inline __u64 wake_flags(__u64 avail, __u64 size)
{
	if (!wakeup_bytes)
		return 0;
	if (avail / wakeup_bytes != (avail + size) / wakeup_bytes)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

/* for bpf_ringbuf_output: the record is not in the ring yet */
static __always_inline __u64 ring_flags(__u64 size)
{
	return wake_flags(wakeup_bytes ? bpf_ringbuf_query(&rb, BPF_RB_AVAIL_DATA) : 0, size);
}

/* for bpf_ringbuf_submit: the reserved record already counts as waiting */
static __always_inline __u64 submit_flags(__u64 size)
{
	__u64 avail;

	if (!wakeup_bytes)
		return 0;
	avail = bpf_ringbuf_query(&rb, BPF_RB_AVAIL_DATA);
	return wake_flags(avail > size ? avail - size : 0, size);
}

/* bpf_get_current_pid_tgid() as the daemon's pid namespace sees it; 0 for a task outside that namespace */
static __always_inline __u64 llmspy_pid_tgid(void)
{
	struct bpf_pidns_info ns;

	if (!pidns_ino)
		return bpf_get_current_pid_tgid();
	if (bpf_get_ns_current_pid_tgid(pidns_dev, pidns_ino, &ns, sizeof(ns)))
		return 0;
	return ((__u64)ns.tgid << 32) | ns.pid;
}

static __always_inline void fill_hdr(struct llmspy_hdr *h, __u16 kind, __u32 size)
{
	__u64 id = llmspy_pid_tgid();

	h->version = LLMSPY_ABI_VERSION;
	h->kind = kind;
	h->size = size;
	h->ts_ns = bpf_ktime_get_ns();
	h->pid = id >> 32;
	h->tid = (__u32)id;
}

/* should the current process be traced? counts the calls it filters out */
static __always_inline bool llmspy_should_trace(void)
{
	__u32 tgid = llmspy_pid_tgid() >> 32;
	__u8 verdict = default_verdict;
	__u8 *v;

	if (tgid == self_tgid || !tgid) { /* !tgid: outside the daemon's pid namespace */
		stat_add(LLMSPY_STAT_FILTERED_CALLS, 1);
		return false;
	}
	v = bpf_map_lookup_elem(&pid_verdict, &tgid);
	if (!v || *v == LLMSPY_VERDICT_UNSET) {
		__u64 cgid = bpf_get_current_cgroup_id();

		v = bpf_map_lookup_elem(&cgroup_verdict, &cgid);
	}
	if (v && *v != LLMSPY_VERDICT_UNSET)
		verdict = *v;
	if (verdict == LLMSPY_VERDICT_SKIP) {
		stat_add(LLMSPY_STAT_FILTERED_CALLS, 1);
		return false;
	}
	return true;
}

/* has user space muted this connection? counts the calls it skips */
static __always_inline bool llmspy_is_muted(__u64 conn)
{
	struct llmspy_conn_key k = {
		.tgid = llmspy_pid_tgid() >> 32,
		.conn = conn,
	};

	if (!bpf_map_lookup_elem(&muted, &k))
		return false;
	stat_add(LLMSPY_STAT_MUTED_CALLS, 1);
	return true;
}

/* state of one emit, shared with the bpf_loop callback */
struct emit_ctx {
	__u64 buf;
	__u64 offset; /* connection offset of buf[0] */
	__u32 cap;  /* bytes to capture */
	__u32 done; /* bytes of cap already handled */
	__u16 last_flags;
	__u32 cpu;
	__u32 tid;  /* owner of the scratch slot while the call is emitted */
	__u64 conn;
};

static long emit_chunk(__u64 i, struct emit_ctx *c)
{
	struct llmspy_tls_data *rec;
	__u64 n = (__u64)c->cap - c->done;
	__u64 size = 0;
	__u16 flags = 0;

	rec = bpf_map_lookup_elem(&scratch, &c->cpu);
	if (!rec)
		return 1;
	if (n > LLMSPY_CHUNK_MAX)
		n = LLMSPY_CHUNK_MAX;
	if (c->done == 0)
		flags |= LLMSPY_F_FIRST;
	if (c->done + n >= c->cap)
		flags |= LLMSPY_F_LAST | c->last_flags;

	rec->offset = c->offset + c->done;
	if (i)
		rec->hdr.ts_ns = bpf_ktime_get_ns(); /* the first took the call's time in fill_hdr */
	/* keep the bound check on the register the helper gets */
	asm volatile("" : "+r"(n));
	if (n > LLMSPY_CHUNK_MAX)
		return 1;
	if (bpf_probe_read_user(rec->data, n, (const void *)(c->buf + c->done))) {
		/* not resident (uprobes cannot fault pages in): the gap shows in offset */
		flags |= LLMSPY_F_FAULT;
		stat_add(LLMSPY_STAT_FAULT_RECORDS, 1);
	} else {
		size = n;
	}
	rec->data_len = size;
	rec->flags = flags;
	rec->hdr.size = LLMSPY_TLS_DATA_SIZE(size);
	asm volatile("" : "+r"(size));
	if (size > LLMSPY_CHUNK_MAX)
		return 1;
	/* on a fully preemptible kernel another task on this CPU may have reused the
	 * slot meanwhile: never submit a mixed record, count the rest of the call lost */
	if (rec->hdr.tid != c->tid || rec->conn != c->conn) {
		stat_add(LLMSPY_STAT_LOST_RECORDS, 1);
		stat_add(LLMSPY_STAT_LOST_BYTES, c->cap - c->done);
		return 1;
	}
	if (bpf_ringbuf_output(&rb, rec, LLMSPY_TLS_DATA_SIZE(size), ring_flags(LLMSPY_TLS_DATA_SIZE(size)))) {
		stat_add(LLMSPY_STAT_LOST_RECORDS, 1);
		stat_add(LLMSPY_STAT_LOST_BYTES, n);
	} else {
		stat_add(LLMSPY_STAT_RECORDS, 1);
		stat_add(LLMSPY_STAT_BYTES, size);
	}
	c->done += n;
	return c->done >= c->cap;
}

/*
 * Emit the len bytes at user address buf that one TLS call moved on conn,
 * in records of at most LLMSPY_CHUNK_MAX bytes, and advance the connection's
 * offset by len whatever happened, so a lost or cut part shows as a gap.
 * Returns false if the connection's socket is not known yet.
 */
static __always_inline bool llmspy_emit(__u64 conn, __u64 buf, __u64 len, __u8 dir, __u8 stack)
{
	struct llmspy_conn_key ok = {
		.tgid = llmspy_pid_tgid() >> 32,
		.dir = dir,
		.conn = conn,
	};
	struct llmspy_conn_key sk = { .tgid = ok.tgid, .conn = conn };
	struct emit_ctx c = {};
	struct llmspy_tls_data *rec;
	struct llmspy_sock *so;
	__u64 zero = 0, *off;

	if (!len)
		return true;
	if (len > 0xffffffffULL)
		len = 0xffffffffULL;
	off = bpf_map_lookup_elem(&offsets, &ok);
	if (!off) {
		bpf_map_update_elem(&offsets, &ok, &zero, BPF_NOEXIST);
		off = bpf_map_lookup_elem(&offsets, &ok);
		if (!off)
			return true;
	}
	stat_add(LLMSPY_STAT_CALLS, 1);

	c.buf = buf;
	c.offset = *off;
	c.cap = len;
	if (max_call_bytes && len > max_call_bytes) {
		c.cap = max_call_bytes;
		c.last_flags = LLMSPY_F_TRUNCATED;
		stat_add(LLMSPY_STAT_TRUNCATED_CALLS, 1);
		stat_add(LLMSPY_STAT_TRUNCATED_BYTES, len - max_call_bytes);
	}
	c.cpu = bpf_get_smp_processor_id();
	c.tid = (__u32)llmspy_pid_tgid();
	c.conn = conn;
	rec = bpf_map_lookup_elem(&scratch, &c.cpu);
	if (!rec) {
		/* scratch sized for fewer CPUs than exist: count as lost */
		stat_add(LLMSPY_STAT_LOST_RECORDS, 1);
		stat_add(LLMSPY_STAT_LOST_BYTES, c.cap);
		__sync_fetch_and_add(off, len);
		return true;
	}

	/* fields common to every record of the call */
	fill_hdr(&rec->hdr, LLMSPY_EV_TLS_DATA, 0);
	rec->conn = conn;
	rec->cgroup_id = bpf_get_current_cgroup_id();
	rec->call_len = len;
	rec->direction = dir;
	rec->stack = stack;
	bpf_get_current_comm(rec->comm, sizeof(rec->comm));
	so = bpf_map_lookup_elem(&socks, &sk);
	if (so) {
		rec->fd = so->fd;
		rec->family = so->family;
		rec->peer_port = so->peer_port;
		rec->local_port = so->local_port;
		__builtin_memcpy(rec->peer_addr, so->peer_addr, sizeof(rec->peer_addr));
	} else {
		rec->fd = -1;
		rec->family = 0;
		rec->peer_port = 0;
		rec->local_port = 0;
		__builtin_memset(rec->peer_addr, 0, sizeof(rec->peer_addr));
	}

	if (c.cap <= LLMSPY_CHUNK_MAX)
		emit_chunk(0, &c); /* most calls: spare bpf_loop's indirect call */
	else
		bpf_loop((c.cap + LLMSPY_CHUNK_MAX - 1) / LLMSPY_CHUNK_MAX, emit_chunk, &c, 0);
	__sync_fetch_and_add(off, len);
	return so != NULL;
}

/* entry of a TLS call: remember its arguments for the return probe */
static __always_inline void llmspy_call_enter(__u64 conn, __u64 buf, __u64 out_len, __u8 dir, __u8 stack)
{
	__u32 tid = (__u32)llmspy_pid_tgid();
	struct llmspy_call *call;

	if (!llmspy_should_trace() || llmspy_is_muted(conn))
		return;
	/* a thread's slot is reused in place: an LRU map update per call costs more than the rest */
	call = bpf_map_lookup_elem(&calls, &tid);
	if (call) {
		call->conn = conn;
		call->buf = buf;
		call->out_len = out_len;
		call->dir = dir;
		call->stack = stack;
	} else {
		struct llmspy_call c = { .conn = conn, .buf = buf, .out_len = out_len, .dir = dir, .stack = stack };

		bpf_map_update_elem(&calls, &tid, &c, BPF_ANY);
	}
}

/*
 * Return of a TLS call. ret is the function's int return value, taken as an
 * int because the upper half of the register is undefined; for the _ex forms
 * (out_len saved) success is ret == 1 and the byte count is *out_len.
 */
static __always_inline void llmspy_call_return(long ret)
{
	__u32 tid = (__u32)llmspy_pid_tgid();
	struct llmspy_call *call, c;
	__u64 len = 0;

	call = bpf_map_lookup_elem(&calls, &tid);
	if (!call || !call->conn) {
		/* filtered at entry, or attached between entry and return */
		return;
	}
	c = *call;
	call->conn = 0; /* consumed: the slot stays for the thread's next call */
	if (c.out_len) {
		if (ret != 1) {
			len = 0;
		} else if (bpf_probe_read_user(&len, sizeof(len), (const void *)c.out_len)) {
			/* the byte count itself is unreadable: nothing to emit, but not silently */
			stat_add(LLMSPY_STAT_FAULT_RECORDS, 1);
			len = 0;
		}
	} else if (ret > 0) {
		len = ret;
	}
	if (len && !llmspy_emit(c.conn, c.buf, len, c.dir, c.stack) && c.dir == LLMSPY_DIR_WRITE) {
		struct llmspy_pending_sock p = { .conn = c.conn, .ts_ns = bpf_ktime_get_ns() };

		bpf_map_update_elem(&pending_socks, &tid, &p, BPF_ANY);
	}
}

/* the TLS object is being freed: end its streams, if we ever saw them */
static __always_inline void llmspy_conn_close(__u64 conn, __u8 stack)
{
	__u32 tgid = llmspy_pid_tgid() >> 32;
	struct llmspy_conn_key w = { .tgid = tgid, .dir = LLMSPY_DIR_WRITE, .conn = conn };
	struct llmspy_conn_key r = { .tgid = tgid, .dir = LLMSPY_DIR_READ, .conn = conn };
	struct llmspy_conn_close *e;
	bool seen;

	seen = bpf_map_delete_elem(&offsets, &w) == 0;
	seen = (bpf_map_delete_elem(&offsets, &r) == 0) || seen;
	/* socks and muted use dir 0 == LLMSPY_DIR_WRITE: key w */
	bpf_map_delete_elem(&socks, &w);
	bpf_map_delete_elem(&muted, &w);
	if (!seen)
		return;
	e = bpf_ringbuf_reserve(&rb, sizeof(*e), 0);
	if (!e) {
		stat_add(LLMSPY_STAT_LOST_EVENTS, 1);
		return;
	}
	fill_hdr(&e->hdr, LLMSPY_EV_CONN_CLOSE, sizeof(*e));
	e->conn = conn;
	e->stack = stack;
	__builtin_memset(e->_pad, 0, sizeof(e->_pad));
	bpf_ringbuf_submit(e, submit_flags(sizeof(*e)));
}

#endif /* __LLMSPY_COMMON_BPF_H */
