// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * process.bpf.c: process lifecycle for discovery (exec, whole-process exit)
 * and the socket behind each TLS connection, learnt from the read/write
 * syscalls a thread makes while it is inside a TLS call.
 */
#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* syscalls through which TLS libraries move ciphertext */
#if defined(__TARGET_ARCH_x86)
#define NR_read 0
#define NR_write 1
#define NR_readv 19
#define NR_writev 20
#define NR_sendto 44
#define NR_recvfrom 45
#define NR_sendmsg 46
#define NR_recvmsg 47
#elif defined(__TARGET_ARCH_arm64)
#define NR_read 63
#define NR_write 64
#define NR_readv 65
#define NR_writev 66
#define NR_sendto 206
#define NR_recvfrom 207
#define NR_sendmsg 211
#define NR_recvmsg 212
#else
#error "syscall numbers for this architecture"
#endif

static __always_inline bool is_write_syscall(long id)
{
	return id == NR_write || id == NR_writev || id == NR_sendto || id == NR_sendmsg;
}

static __always_inline bool is_io_syscall(long id)
{
	switch (id) {
	case NR_read:
	case NR_write:
	case NR_readv:
	case NR_writev:
	case NR_sendto:
	case NR_recvfrom:
	case NR_sendmsg:
	case NR_recvmsg:
		return true;
	}
	return false;
}

/*
 * A thread inside a TLS call does I/O on fd, or writes soon after a TLS write
 * whose socket is not known (pending_socks): note fd's socket for the connection.
 */
SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter_io, struct pt_regs *regs, long id)
{
	struct llmspy_conn_key k = {};
	struct llmspy_sock so = {};
	struct llmspy_pending_sock *pend;
	struct llmspy_call *call;
	struct llmspy_sock *known;
	struct task_struct *task;
	struct file **fds, *f;
	struct socket *sock;
	struct sock *sk;
	__u32 tid;
	int fd;

	if (!is_io_syscall(id))
		return 0;
	tid = (__u32)llmspy_pid_tgid();
	call = bpf_map_lookup_elem(&calls, &tid);
	if (call && !call->conn)
		call = NULL; /* a free slot: the thread is not inside a TLS call */
	if (call) {
		k.conn = call->conn;
	} else {
		if (!is_write_syscall(id))
			return 0;
		pend = bpf_map_lookup_elem(&pending_socks, &tid);
		if (!pend)
			return 0;
		if (bpf_ktime_get_ns() - pend->ts_ns > LLMSPY_PENDING_SOCK_NS) {
			bpf_map_delete_elem(&pending_socks, &tid);
			return 0;
		}
		/* kept until a TCP socket is found: the first write may go to a pipe */
		k.conn = pend->conn;
	}
	fd = (int)PT_REGS_PARM1_CORE(regs);
	k.tgid = llmspy_pid_tgid() >> 32;
	known = bpf_map_lookup_elem(&socks, &k);
	if (known && known->fd == fd)
		return 0;

	task = bpf_get_current_task_btf();
	if (fd < 0 || fd >= BPF_CORE_READ(task, files, fdt, max_fds))
		return 0;
	fds = BPF_CORE_READ(task, files, fdt, fd);
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) || !f)
		return 0;
	if ((BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return 0;
	sock = BPF_CORE_READ(f, private_data);
	sk = BPF_CORE_READ(sock, sk);
	if (!sk)
		return 0;
	so.family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (so.family == AF_INET) {
		__u32 daddr = BPF_CORE_READ(sk, __sk_common.skc_daddr);

		__builtin_memcpy(so.peer_addr, &daddr, sizeof(daddr));
	} else if (so.family == AF_INET6) {
		BPF_CORE_READ_INTO(&so.peer_addr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	} else {
		return 0; /* unix sockets and the like carry no peer worth showing */
	}
	so.fd = fd;
	so.peer_port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	so.local_port = BPF_CORE_READ(sk, __sk_common.skc_num);
	bpf_map_update_elem(&socks, &k, &so, BPF_ANY);
	if (!call)
		bpf_map_delete_elem(&pending_socks, &tid);
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(process_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	struct llmspy_exec *e;

	e = bpf_ringbuf_reserve(&rb, sizeof(*e), 0);
	if (!e) {
		stat_add(LLMSPY_STAT_LOST_EVENTS, 1);
		return 0;
	}
	fill_hdr(&e->hdr, LLMSPY_EV_EXEC, sizeof(*e));
	if (!e->hdr.pid) { /* outside the daemon's pid namespace: not ours to see */
		bpf_ringbuf_discard(e, 0);
		return 0;
	}
	/* the parent's id in the daemon's pid namespace is not at hand there: 0 = unknown */
	e->ppid = pidns_ino ? 0 : BPF_CORE_READ(p, real_parent, tgid);
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	if (bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), BPF_CORE_READ(bprm, filename)) < 0)
		e->filename[0] = 0;
	/* always wake the reader: a new process must be probed before it gets to its first TLS call */
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(process_exit, struct task_struct *p, bool group_dead)
{
	struct llmspy_exit *e;

	if (!group_dead)
		return 0;
	e = bpf_ringbuf_reserve(&rb, sizeof(*e), 0);
	if (!e) {
		stat_add(LLMSPY_STAT_LOST_EVENTS, 1);
		return 0;
	}
	/* the exiting task is current: fill_hdr gives its ids, in the daemon's pid namespace if it has one */
	fill_hdr(&e->hdr, LLMSPY_EV_EXIT, sizeof(*e));
	if (!e->hdr.pid) {
		bpf_ringbuf_discard(e, 0);
		return 0;
	}
	e->exit_code = BPF_CORE_READ(p, exit_code);
	e->_pad = 0;
	bpf_ringbuf_submit(e, submit_flags(sizeof(*e)));
	return 0;
}
