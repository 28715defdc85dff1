// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * tls_gnutls.bpf.c: plaintext of GnuTLS's record layer, captured at return
 * with the real byte count; gnutls_deinit ends the connection. The
 * connection key is the gnutls_session_t pointer.
 *
 * User space binds these programs to every entry point that moves
 * application data through a caller's buffer (see llmspyd/bpf/probes.py):
 *   gnutls_record_send(session, data, size)           -> gnutls_send_enter
 *   gnutls_record_send2(session, data, size, pad, fl) -> gnutls_send_enter
 *   gnutls_record_recv(session, data, size)           -> gnutls_recv_enter
 *   gnutls_record_recv_seq(session, data, size, seq)  -> gnutls_recv_enter
 * Debian's gnutls_record_send tail-jumps to gnutls_record_send2 through the
 * PLT: both entry probes then save the same call for the thread and the
 * first of the two return probes emits it, the second finds it gone.
 * gnutls_record_recv_packet hands out GnuTLS's own buffer and is not covered.
 */
#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("uprobe")
int BPF_KPROBE(gnutls_send_enter, void *session, const void *data, size_t size)
{
	llmspy_call_enter((__u64)session, (__u64)data, 0, LLMSPY_DIR_WRITE, LLMSPY_STACK_GNUTLS);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(gnutls_recv_enter, void *session, void *data, size_t size)
{
	llmspy_call_enter((__u64)session, (__u64)data, 0, LLMSPY_DIR_READ, LLMSPY_STACK_GNUTLS);
	return 0;
}

/* ssize_t: bytes moved, or a negative GNUTLS_E_* (AGAIN, INTERRUPTED, ...) that moved none */
SEC("uretprobe")
int BPF_KRETPROBE(gnutls_rw_return, long ret)
{
	llmspy_call_return(ret);
	return 0;
}

/* void gnutls_deinit(gnutls_session_t session) */
SEC("uprobe")
int BPF_KPROBE(gnutls_deinit_enter, void *session)
{
	if (session)
		llmspy_conn_close((__u64)session, LLMSPY_STACK_GNUTLS);
	return 0;
}
