/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * llmspy.h: the one contract between the kernel programs (bpf/) and the
 * daemon (llmspyd/). Every record in the ring buffer starts with
 * struct llmspy_hdr; hdr.kind says which struct follows.
 *
 * Mirrored once in llmspyd/bpf/abi.py; tests/unit/test_abi.py checks the
 * mirror against the BTF of the compiled objects. Change both together and
 * bump LLMSPY_ABI_VERSION.
 */
#ifndef __LLMSPY_H
#define __LLMSPY_H

#define LLMSPY_ABI_VERSION 1

#define LLMSPY_COMM_LEN 16
#define LLMSPY_PATH_LEN 256
/* payload bytes per TLS data record; a longer call becomes several records */
#define LLMSPY_CHUNK_MAX 32768

enum llmspy_kind {
	LLMSPY_EV_TLS_DATA = 1,   /* plaintext of one TLS read/write call, or part of it */
	LLMSPY_EV_CONN_CLOSE = 2, /* the TLS object was freed: its byte streams end */
	LLMSPY_EV_EXEC = 3,       /* a process called execve */
	LLMSPY_EV_EXIT = 4,       /* a whole process exited */
};

enum llmspy_dir {
	LLMSPY_DIR_WRITE = 0, /* plaintext the process sent */
	LLMSPY_DIR_READ = 1,  /* plaintext the process received */
};

enum llmspy_stack {
	LLMSPY_STACK_UNKNOWN = 0,
	LLMSPY_STACK_OPENSSL = 1,
	LLMSPY_STACK_GNUTLS = 2,
	LLMSPY_STACK_GOTLS = 3,
	LLMSPY_STACK_BORINGSSL = 4,
	LLMSPY_STACK_RUSTLS = 5,
};

/* values of the pid_verdict / cgroup_verdict filter maps and of default_verdict */
enum llmspy_verdict {
	LLMSPY_VERDICT_UNSET = 0, /* no opinion: fall through to the next filter */
	LLMSPY_VERDICT_TRACE = 1,
	LLMSPY_VERDICT_SKIP = 2,
};

/* llmspy_tls_data.flags */
#define LLMSPY_F_FIRST (1 << 0)     /* first record of its call */
#define LLMSPY_F_LAST (1 << 1)      /* last record of its call */
#define LLMSPY_F_TRUNCATED (1 << 2) /* call longer than max_call_bytes: the rest is not captured */
#define LLMSPY_F_FAULT (1 << 3)     /* the user buffer could not be read: data[] is empty */

/* per-reason counters in the per-CPU array map "stats" */
enum llmspy_stat {
	LLMSPY_STAT_CALLS = 0,           /* TLS calls that moved data and were traced */
	LLMSPY_STAT_RECORDS,             /* data records submitted */
	LLMSPY_STAT_BYTES,               /* plaintext bytes submitted */
	LLMSPY_STAT_LOST_RECORDS,        /* records lost: ring buffer full */
	LLMSPY_STAT_LOST_BYTES,          /* plaintext bytes lost: ring buffer full */
	LLMSPY_STAT_TRUNCATED_CALLS,     /* calls cut at max_call_bytes */
	LLMSPY_STAT_TRUNCATED_BYTES,     /* bytes not captured because of max_call_bytes */
	LLMSPY_STAT_FAULT_RECORDS,       /* records whose user buffer could not be read */
	LLMSPY_STAT_FILTERED_CALLS,      /* calls skipped: process filtered out */
	LLMSPY_STAT_MUTED_CALLS,         /* calls skipped: connection muted by the daemon */
	LLMSPY_STAT_ORPHAN_RETURNS,      /* return probe without a matching entry */
	LLMSPY_STAT_LOST_EVENTS,         /* exec/exit/close records lost: ring buffer full */
	LLMSPY_STAT__MAX,
};

struct llmspy_hdr {
	__u16 version; /* LLMSPY_ABI_VERSION */
	__u16 kind;    /* enum llmspy_kind */
	__u32 size;    /* whole record in bytes, header included */
	__u64 ts_ns;   /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 pid;     /* thread group id */
	__u32 tid;
};

struct llmspy_tls_data {
	struct llmspy_hdr hdr;
	__u64 conn;      /* address of the TLS object (SSL *, gnutls_session_t, *tls.Conn); with pid, the connection key */
	__u64 offset;    /* bytes in this direction on this connection before data[0] */
	__u64 cgroup_id;
	__u32 call_len;  /* bytes the whole TLS call moved */
	__u32 data_len;  /* bytes in data[] */
	__s32 fd;        /* socket fd, -1 when not known */
	__u16 flags;     /* LLMSPY_F_* */
	__u8 direction;  /* enum llmspy_dir */
	__u8 stack;      /* enum llmspy_stack */
	__u16 family;    /* AF_INET or AF_INET6; 0 when the peer is not known */
	__u16 peer_port; /* host byte order */
	__u16 local_port;
	__u8 peer_addr[16]; /* IPv4 in the first 4 bytes */
	char comm[LLMSPY_COMM_LEN];
	__u8 _pad[2];       /* so data[] starts at sizeof(struct llmspy_tls_data) */
	__u8 data[];
};

/* record size for n payload bytes */
#define LLMSPY_TLS_DATA_SIZE(n) (sizeof(struct llmspy_tls_data) + (n))

struct llmspy_conn_close {
	struct llmspy_hdr hdr;
	__u64 conn;
	__u8 stack;
	__u8 _pad[7];
};

struct llmspy_exec {
	struct llmspy_hdr hdr;
	__u32 ppid;
	__u32 uid;
	__u64 cgroup_id;
	char comm[LLMSPY_COMM_LEN];
	char filename[LLMSPY_PATH_LEN];
};

struct llmspy_exit {
	struct llmspy_hdr hdr;
	__s32 exit_code; /* as wait(2) reports it: exit status << 8, or the killing signal */
	__u32 _pad;
};

#endif /* __LLMSPY_H */
