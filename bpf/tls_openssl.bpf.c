// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * tls_openssl.bpf.c: plaintext of OpenSSL's SSL_write/SSL_read and their _ex
 * forms, captured at return with the real byte count; SSL_free ends the
 * connection. One program per role: user space binds each to every libssl
 * and every executable that exports the functions (node), and passes the
 * stack (OpenSSL, BoringSSL, ...) as the attach cookie.
 */
#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline __u8 cookie_stack(void *ctx)
{
	__u64 c = bpf_get_attach_cookie(ctx);

	return c ? (__u8)c : LLMSPY_STACK_OPENSSL;
}

/* int SSL_write(SSL *ssl, const void *buf, int num) */
SEC("uprobe")
int BPF_KPROBE(ssl_write_enter, void *ssl, const void *buf, int num)
{
	llmspy_call_enter((__u64)ssl, (__u64)buf, 0, LLMSPY_DIR_WRITE, cookie_stack(ctx));
	return 0;
}

/* int SSL_read(SSL *ssl, void *buf, int num) */
SEC("uprobe")
int BPF_KPROBE(ssl_read_enter, void *ssl, void *buf, int num)
{
	llmspy_call_enter((__u64)ssl, (__u64)buf, 0, LLMSPY_DIR_READ, cookie_stack(ctx));
	return 0;
}

/* int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written) */
SEC("uprobe")
int BPF_KPROBE(ssl_write_ex_enter, void *ssl, const void *buf, size_t num, size_t *written)
{
	if (!written)
		return 0;
	llmspy_call_enter((__u64)ssl, (__u64)buf, (__u64)written, LLMSPY_DIR_WRITE, cookie_stack(ctx));
	return 0;
}

/* int SSL_read_ex(SSL *s, void *buf, size_t num, size_t *readbytes) */
SEC("uprobe")
int BPF_KPROBE(ssl_read_ex_enter, void *ssl, void *buf, size_t num, size_t *readbytes)
{
	if (!readbytes)
		return 0;
	llmspy_call_enter((__u64)ssl, (__u64)buf, (__u64)readbytes, LLMSPY_DIR_READ, cookie_stack(ctx));
	return 0;
}

/* one return program for all four: the saved call knows its direction and form */
SEC("uretprobe")
int BPF_KRETPROBE(ssl_rw_return, int ret)
{
	llmspy_call_return(ret);
	return 0;
}

/* void SSL_free(SSL *ssl) */
SEC("uprobe")
int BPF_KPROBE(ssl_free_enter, void *ssl)
{
	if (ssl)
		llmspy_conn_close((__u64)ssl, cookie_stack(ctx));
	return 0;
}
