// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * tls_gotls.bpf.c: plaintext of Go's crypto/tls, for Go >= 1.17 on amd64.
 *
 * Go's register ABI (ABIInternal, amd64): the receiver and arguments arrive
 * in RAX, RBX, RCX, RDI, ...; results leave in RAX, RBX, RCX, ...; R14 always
 * holds the running goroutine (g). So for
 *   func (c *Conn) Write(b []byte) (int, error)
 *   func (c *Conn) Read(b []byte) (int, error)
 * at entry: RAX = c, RBX = b's data pointer, RCX = len(b), RDI = cap(b);
 * at each RET: RAX = n, RBX:RCX = the error interface.
 *
 * NEVER a uretprobe here: Go copies goroutine stacks when they grow or
 * shrink, and a return address rewritten by a uretprobe would be copied to
 * a stack where the kernel does not expect it, and crash the program.
 * Instead user space finds every RET instruction of Read (llmspyd/discovery/
 * golang.py) and puts a plain uprobe on each.
 *
 * Write is emitted at entry, whole: its data is complete there, and a Write
 * that fails part-way leaves the tls.Conn permanently broken (Go keeps the
 * error), so at most the tail of a dead connection is reported as sent.
 * Read is emitted at its RETs with n from RAX; its buffer is saved at entry
 * keyed by goroutine, not thread: a goroutine that blocks in Read may resume
 * on another thread.
 *
 * fd and peer, until the connection's socket is known (map "socks"): when
 * user space knew the struct layout from DWARF (map go_fd_layouts), it is
 * read straight from the connection before the first record (the "dwarf"
 * path): tls.Conn.conn (net.Conn interface) -> *net.TCPConn -> netFD ->
 * pfd.Sysfd. Otherwise the entry probes mark the thread as inside a TLS call
 * (map "calls"), so process.bpf.c learns the socket from the read/write
 * syscall made on the same thread (the "syscall" path).
 */
#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Reads in flight at once (one per goroutine blocked in Read) */
#define GO_MAX_READS 16384
/* binaries whose fd layout user space knows */
#define GO_MAX_LAYOUTS 1024
/* runtime.itab / internal/abi.ITab: inter, _type, hash, pad, then fun[] */
#define GO_ITAB_FUN_OFF 24
/* net.Conn's sorted methods: Close, LocalAddr, Read, ... */
#define GO_NETCONN_CLOSE 0
#define GO_NETCONN_READ 2

struct go_read_key {
	__u32 tgid;
	__u32 _pad;
	__u64 g; /* R14 at entry of Read and at its RETs */
};

struct go_read {
	__u64 conn;
	__u64 buf;
	__u8 marked; /* the thread was marked for the syscall path at entry */
	__u8 _pad[7];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, GO_MAX_READS);
	__type(key, struct go_read_key);
	__type(value, struct go_read);
} go_reads SEC(".maps");

/*
 * Key: address of net.(*TCPConn).Close in a binary (itab.fun[0] of
 * *net.TCPConn as a net.Conn); tcpconn_read (fun[2]) must match too, so that
 * two binaries with one address for different code cannot be confused.
 * tls.Conn.conn is at offset 0 in every Go release; user space only fills
 * this map when DWARF confirms it.
 */
struct go_fd_layout {
	__u64 tcpconn_read;
	__u32 fd_off;    /* net.TCPConn.conn.fd: *netFD */
	__u32 pfd_off;   /* net.netFD.pfd: internal/poll.FD */
	__u32 sysfd_off; /* internal/poll.FD.Sysfd: int */
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, GO_MAX_LAYOUTS);
	__type(key, __u64);
	__type(value, struct go_fd_layout);
} go_fd_layouts SEC(".maps");

static __always_inline __u64 read_u64(__u64 addr)
{
	__u64 v = 0;

	bpf_probe_read_user(&v, sizeof(v), (const void *)addr);
	return v;
}

/* the "dwarf" path: note the connection's socket from its Go structures; false when it cannot */
static __always_inline bool go_learn_sock(__u64 conn)
{
	struct llmspy_conn_key k = { .tgid = llmspy_pid_tgid() >> 32, .conn = conn };
	struct llmspy_sock so = {};
	struct go_fd_layout *lay;
	struct task_struct *task;
	struct file **fds, *f;
	struct socket *sock;
	struct sock *sk;
	__u64 itab, data, netfd, fun0;
	__s64 fd;

	itab = read_u64(conn);
	data = read_u64(conn + 8);
	if (!itab || !data)
		return false;
	fun0 = read_u64(itab + GO_ITAB_FUN_OFF + 8 * GO_NETCONN_CLOSE);
	lay = bpf_map_lookup_elem(&go_fd_layouts, &fun0);
	if (!lay || read_u64(itab + GO_ITAB_FUN_OFF + 8 * GO_NETCONN_READ) != lay->tcpconn_read)
		return false; /* not a *net.TCPConn, or a binary without known layout */
	netfd = read_u64(data + lay->fd_off);
	if (!netfd)
		return false;
	fd = (__s64)read_u64(netfd + lay->pfd_off + lay->sysfd_off);

	task = bpf_get_current_task_btf();
	if (fd < 0 || fd >= BPF_CORE_READ(task, files, fdt, max_fds))
		return false;
	fds = BPF_CORE_READ(task, files, fdt, fd);
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) || !f)
		return false;
	if ((BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return false;
	sock = BPF_CORE_READ(f, private_data);
	sk = BPF_CORE_READ(sock, sk);
	if (!sk)
		return false;
	so.family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (so.family == AF_INET) {
		__u32 daddr = BPF_CORE_READ(sk, __sk_common.skc_daddr);

		__builtin_memcpy(so.peer_addr, &daddr, sizeof(daddr));
	} else if (so.family == AF_INET6) {
		BPF_CORE_READ_INTO(&so.peer_addr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	} else {
		return false;
	}
	so.fd = fd;
	so.peer_port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	so.local_port = BPF_CORE_READ(sk, __sk_common.skc_num);
	return bpf_map_update_elem(&socks, &k, &so, BPF_ANY) == 0;
}

/* the "syscall" path: process.bpf.c attributes this thread's socket I/O to conn */
static __always_inline void mark_thread(__u64 conn, __u64 buf, __u8 dir)
{
	__u32 tid = (__u32)llmspy_pid_tgid();
	struct llmspy_call call = { .conn = conn, .buf = buf, .dir = dir, .stack = LLMSPY_STACK_GOTLS };

	bpf_map_update_elem(&calls, &tid, &call, BPF_ANY);
}

/* conn 0: whatever Go call marked this thread */
static __always_inline void unmark_thread(__u64 conn)
{
	__u32 tid = (__u32)llmspy_pid_tgid();
	struct llmspy_call *call = bpf_map_lookup_elem(&calls, &tid);

	if (call && (!conn || call->conn == conn) && call->stack == LLMSPY_STACK_GOTLS)
		bpf_map_delete_elem(&calls, &tid);
}

/*
 * Until the connection's socket is known: from the DWARF layout at once, else
 * from the next syscall on this thread. Once known, a mark left by an earlier
 * Write (which has no return probe) is dropped, so that later unrelated I/O on
 * the thread is not taken for it. Returns whether the thread is now marked.
 */
static __always_inline bool go_find_sock(__u64 conn, __u64 buf, __u8 dir)
{
	struct llmspy_conn_key k = { .tgid = llmspy_pid_tgid() >> 32, .conn = conn };

	if (bpf_map_lookup_elem(&socks, &k) || go_learn_sock(conn)) {
		unmark_thread(0);
		return false;
	}
	mark_thread(conn, buf, dir);
	return true;
}

/* entry of crypto/tls.(*Conn).Write: RAX = c, RBX = b.ptr, RCX = len(b) */
SEC("uprobe")
int go_write_enter(struct pt_regs *ctx)
{
	__u64 conn = ctx->ax, buf = ctx->bx, len = ctx->cx;

	if (!conn || !len || !llmspy_should_trace() || llmspy_is_muted(conn))
		return 0;
	go_find_sock(conn, buf, LLMSPY_DIR_WRITE);
	llmspy_emit(conn, buf, len, LLMSPY_DIR_WRITE, LLMSPY_STACK_GOTLS);
	return 0;
}

/* entry of crypto/tls.(*Conn).Read: RAX = c, RBX = b.ptr, RCX = len(b), R14 = g */
SEC("uprobe")
int go_read_enter(struct pt_regs *ctx)
{
	struct go_read_key k = { .tgid = llmspy_pid_tgid() >> 32, .g = ctx->r14 };
	struct go_read r = { .conn = ctx->ax, .buf = ctx->bx };

	if (!r.conn || !ctx->cx || !llmspy_should_trace() || llmspy_is_muted(r.conn))
		return 0;
	r.marked = go_find_sock(r.conn, r.buf, LLMSPY_DIR_READ);
	bpf_map_update_elem(&go_reads, &k, &r, BPF_ANY);
	return 0;
}

/* each RET of crypto/tls.(*Conn).Read: RAX = n, R14 = g */
SEC("uprobe")
int go_read_ret(struct pt_regs *ctx)
{
	struct go_read_key k = { .tgid = llmspy_pid_tgid() >> 32, .g = ctx->r14 };
	struct go_read *r;
	long n = ctx->ax;

	r = bpf_map_lookup_elem(&go_reads, &k);
	if (!r)
		return 0; /* filtered or muted at entry, or attached while this Read was running */
	if (n > 0)
		llmspy_emit(r->conn, r->buf, n, LLMSPY_DIR_READ, LLMSPY_STACK_GOTLS);
	if (r->marked)
		unmark_thread(r->conn);
	bpf_map_delete_elem(&go_reads, &k);
	return 0;
}

/* entry of crypto/tls.(*Conn).Close: RAX = c */
SEC("uprobe")
int go_close_enter(struct pt_regs *ctx)
{
	__u64 conn = ctx->ax;

	if (conn) {
		unmark_thread(conn);
		llmspy_conn_close(conn, LLMSPY_STACK_GOTLS);
	}
	return 0;
}
