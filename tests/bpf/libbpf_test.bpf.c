// SPDX-License-Identifier: GPL-2.0
/* Test-only object for tests/e2e/test_libbpf.py and tests/unit/test_abi.py:
 * small uprobe/uretprobe/raw_tp programs exercising every feature of our
 * ctypes binding. Compiled by the test fixture, never shipped.
 * -DSECOND builds a twin with other program names that shares the maps. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "llmspy.h"

char LICENSE[] SEC("license") = "GPL";

struct test_event {
	__u32 pid;
	__u32 kind; /* 1 entry, 2 return, 3 raw_tp, 4 second object */
	__s64 value;
	__u64 tag;
	char label[8];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
#ifdef BAD_SHARED
	__type(value, __u32); /* disagrees with the first object: ObjectSet must refuse */
#else
	__type(value, __u64);
#endif
} shared SEC(".maps");

/* a real llmspy ring and stats array, as the shipped objects have them */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} rb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LLMSPY_STAT__MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

#define TLS_LIKE_MAX 64

/* knobs the loader sets before load */
const volatile __u64 tag = 0;
const volatile char label[8] = {};
const volatile __u32 only_pid = 0; /* 0: every process */
const volatile __u32 no_wakeup = 0; /* submit tls_like records without waking the reader */

/* keep every ABI struct and enum in this object's BTF for tests/unit/test_abi.py */
struct llmspy_hdr abi_hdr;
struct llmspy_tls_data abi_tls_data;
struct llmspy_conn_close abi_conn_close;
struct llmspy_exec abi_exec;
struct llmspy_exit abi_exit;
enum llmspy_kind abi_kind;
enum llmspy_dir abi_dir;
enum llmspy_stack abi_stack;
enum llmspy_stat abi_stat;
enum llmspy_verdict abi_verdict;

static __always_inline int emit(__u32 kind, __s64 value)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	__u32 slot = kind;
	struct test_event *e;
	__u64 *n;

	if (only_pid && pid != only_pid)
		return 0;
	n = bpf_map_lookup_elem(&counts, &slot);
	if (n)
		*n += 1;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return 0;
	e->pid = pid;
	e->kind = kind;
	e->value = value;
	e->tag = tag;
	for (int i = 0; i < sizeof(e->label); i++)
		e->label[i] = label[i]; /* volatile reads: not folded to the initial zeros */
	bpf_ringbuf_submit(e, 0);
	return 0;
}

#ifdef BAD_PROG
/* the verifier must refuse this: the lookup may return NULL */
SEC("raw_tp/sys_enter")
int bad_prog(void *ctx)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&shared, &k); /* a hash map: may really be NULL */

	*v += 1;
	return 0;
}
#endif

#ifndef SECOND
SEC("uprobe")
int BPF_KPROBE(on_enter, const char *arg)
{
	char buf[16] = {};
	long v = 0;

	/* value: the first decimal digits of the string argument (atoi-like) */
	bpf_probe_read_user_str(buf, sizeof(buf), arg);
	for (int i = 0; i < 15; i++) {
		if (buf[i] < '0' || buf[i] > '9')
			break;
		v = v * 10 + (buf[i] - '0');
	}
	return emit(1, v);
}

static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		*v += n;
}

/* emits the string argument as an llmspy TLS data record, laid out as bpf/llmspy.h says */
SEC("uprobe")
int BPF_KPROBE(tls_like, const char *arg)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct llmspy_tls_data *e;
	long n;

	if (only_pid && (id >> 32) != only_pid)
		return 0;
	e = bpf_ringbuf_reserve(&rb, LLMSPY_TLS_DATA_SIZE(TLS_LIKE_MAX), 0);
	if (!e) {
		stat_add(LLMSPY_STAT_LOST_RECORDS, 1);
		return 0;
	}
	n = bpf_probe_read_user_str(e->data, TLS_LIKE_MAX, arg);
	if (n < 1)
		n = 1;
	n -= 1; /* without the NUL */
	e->hdr.version = LLMSPY_ABI_VERSION;
	e->hdr.kind = LLMSPY_EV_TLS_DATA;
	e->hdr.size = LLMSPY_TLS_DATA_SIZE(TLS_LIKE_MAX);
	e->hdr.ts_ns = bpf_ktime_get_ns();
	e->hdr.pid = id >> 32;
	e->hdr.tid = (__u32)id;
	e->conn = 0x1234;
	e->offset = tag;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->call_len = n;
	e->data_len = n;
	e->fd = -1;
	e->flags = LLMSPY_F_FIRST | LLMSPY_F_LAST;
	e->direction = LLMSPY_DIR_WRITE;
	e->stack = LLMSPY_STACK_OPENSSL;
	e->family = 2; /* AF_INET 127.0.0.1:443 */
	e->peer_port = 443;
	e->local_port = 40000;
	__builtin_memset(e->peer_addr, 0, sizeof(e->peer_addr));
	e->peer_addr[0] = 127;
	e->peer_addr[3] = 1;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	bpf_ringbuf_submit(e, no_wakeup ? BPF_RB_NO_WAKEUP : 0);
	stat_add(LLMSPY_STAT_RECORDS, 1);
	stat_add(LLMSPY_STAT_BYTES, n);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(on_return, long ret)
{
	return emit(2, ret);
}

SEC("raw_tp/sys_enter")
int on_sys_enter(void *ctx)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;

	if (!only_pid || pid != only_pid)
		return 0;
	return emit(3, 0);
}
#else
SEC("uprobe")
int BPF_KPROBE(second_enter, const char *arg)
{
	__u32 key = bpf_get_current_pid_tgid() >> 32;
	__u64 one = 1, *v;

	v = bpf_map_lookup_elem(&shared, &key);
	if (v)
		__sync_fetch_and_add(v, 1);
	else
		bpf_map_update_elem(&shared, &key, &one, BPF_ANY);
	return emit(4, 0);
}
#endif
