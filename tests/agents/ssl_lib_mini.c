/* A miniature of BoringSSL's ssl/ssl_lib.cc: the same error calls, reason codes and
 * shapes the finder relies on. tests/unit/test_boringssl.py compiles it (as ssl/ssl_lib.cc, for __FILE__). */
#include <stddef.h>
#include <string.h>
#include <stdio.h>

struct s3 { unsigned char *pending; size_t pending_len; int rwstate; int read_shutdown; };
struct ssl_method { int (*write_app_data)(void *ssl, int *needs, size_t *written, const unsigned char *buf, size_t len); };
typedef struct ssl_st SSL;
struct ssl_st { const struct ssl_method *method; struct s3 *s3; void *quic_method; int (*do_handshake)(SSL *); int in_init; };

#ifdef LTO_ARGS /* LTO drops ERR_put_error's unused argument: file moves from RCX to RDX */
__attribute__((noinline)) void ERR_put_error(int lib, int reason, const char *file, unsigned line) {
  fprintf(stderr, "%d:%d %s:%u\n", lib, reason, file, line);
}
#define OPENSSL_PUT_ERROR(r) ERR_put_error(16, r, __FILE__, __LINE__)
#else
__attribute__((noinline)) void ERR_put_error(int lib, int unused, int reason, const char *file, unsigned line) {
  fprintf(stderr, "%d:%d:%d %s:%u\n", lib, unused, reason, file, line);
}
#define OPENSSL_PUT_ERROR(r) ERR_put_error(16, 0, r, __FILE__, __LINE__)
#endif

__attribute__((noinline)) int SSL_do_handshake(SSL *ssl) {
  if (ssl->do_handshake == NULL) { OPENSSL_PUT_ERROR(134); return -1; }
  if (!ssl->in_init) return 1;
  return ssl->do_handshake(ssl);
}

__attribute__((noinline)) static int ssl_read_impl(SSL *ssl) {
  if (ssl->do_handshake == NULL) { OPENSSL_PUT_ERROR(226); return -1; }
  while (ssl->s3->pending_len == 0) {
    while (ssl->in_init) {
      int ret = SSL_do_handshake(ssl);
      if (ret < 0) return ret;
      if (ret == 0) { OPENSSL_PUT_ERROR(215); return -1; }
    }
    if (ssl->s3->read_shutdown) return 0;
    ssl->s3->rwstate = 3;
    return -1;
  }
  return 1;
}

#ifdef INLINE_PEEK /* as in Bun and Claude Code: SSL_peek's body inlined into SSL_read */
static inline __attribute__((always_inline))
#else
__attribute__((noinline))
#endif
int SSL_peek(SSL *ssl, void *buf, int num) {
  if (ssl->quic_method != NULL) { OPENSSL_PUT_ERROR(66); return -1; }
  int ret = ssl_read_impl(ssl);
  if (ret <= 0) return ret;
  if (num <= 0) return num;
  size_t todo = ssl->s3->pending_len < (size_t)num ? ssl->s3->pending_len : (size_t)num;
  memcpy(buf, ssl->s3->pending, todo);
  return (int)todo;
}

__attribute__((noinline)) int SSL_read(SSL *ssl, void *buf, int num) {
  int ret = SSL_peek(ssl, buf, num);
  if (ret <= 0) return ret;
  ssl->s3->pending += ret;
  ssl->s3->pending_len -= ret;
  return ret;
}

#ifdef WRITE_EXTRA_ARG /* SSL_write's errors in a 4-argument function: not the shape the probe reads */
#define WRITE_PARAMS SSL *ssl, const void *buf, int num, int flags
#define WRITE_FLAGS flags
#define WRITE_EXTRA , argc
#else
#define WRITE_PARAMS SSL *ssl, const void *buf, int num
#define WRITE_FLAGS 0
#define WRITE_EXTRA
#endif
__attribute__((noinline)) int SSL_write(WRITE_PARAMS) {
  if (ssl->quic_method != NULL) { OPENSSL_PUT_ERROR(66); return -1; }
  if (ssl->do_handshake == NULL) { OPENSSL_PUT_ERROR(226); return -1; }
  int ret = 0, needs = WRITE_FLAGS;
  size_t written = 0;
  do {
    if (ssl->in_init) {
      ret = SSL_do_handshake(ssl);
      if (ret < 0) return ret;
      if (ret == 0) { OPENSSL_PUT_ERROR(215); return -1; }
    }
#ifndef NO_BAD_LENGTH
    if (num < 0) { OPENSSL_PUT_ERROR(111); return -1; }
#endif
    ret = ssl->method->write_app_data(ssl, &needs, &written, buf, (size_t)num);
  } while (needs);
  return ret <= 0 ? ret : (int)written;
}

__attribute__((noinline)) int SSL_shutdown(SSL *ssl) {
  if (ssl->do_handshake == NULL) { OPENSSL_PUT_ERROR(226); return -1; }
  if (ssl_read_impl(ssl) > 0) { OPENSSL_PUT_ERROR(291); return -1; }
  return 1;
}

static int fake_write(void *ssl, int *needs, size_t *written, const unsigned char *buf, size_t len) {
  (void)ssl; *needs = 0; *written = len; return fwrite(buf, 1, len, stdout) > 0;
}

int main(int argc, char **argv) {
  static const struct ssl_method m = {fake_write};
  unsigned char data[] = "hello";
  struct s3 s3 = {data, 5, 0, 0};
  SSL ssl = {&m, &s3, NULL, SSL_do_handshake, argc > 5};
  char buf[16];
  int n = SSL_read(&ssl, buf, sizeof buf);
  SSL_peek(&ssl, buf, sizeof buf);
  SSL_write(&ssl, buf, n > 0 ? n : 0 WRITE_EXTRA);
  return SSL_shutdown(&ssl) + (argc > 9 ? SSL_do_handshake(&ssl) : 0) + (argv == NULL);
}
