// Test client for the Go crypto/tls capture tests: built at test time with
// each Go toolchain, stripped and not. Uses only the standard library.
//
// Each request POSTs a deterministic body to the server's /echo endpoint,
// which answers with a deterministic body of the size asked for. One line per
// request goes to stdout, in request order, so that a run with probes attached
// can be compared with a run without.
package main

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
)

// pattern returns n bytes that depend on seed, so each body is distinct:
// SHA-256 of "seed:block" for consecutive blocks (tests/go/pattern.py mirrors it).
func pattern(n int, seed int) []byte {
	b := make([]byte, 0, n+sha256.Size)
	for blk := 0; len(b) < n; blk++ {
		s := sha256.Sum256([]byte(fmt.Sprintf("%d:%d", seed, blk)))
		b = append(b, s[:]...)
	}
	return b[:n]
}

// recurse grows the goroutine stack (each frame holds a 1 KiB array) and lets
// it shrink again when it returns: the runtime copies stacks while probes
// are attached to this program.
//
//go:noinline
func recurse(depth int) int {
	var pad [1024]byte
	pad[depth%1024] = byte(depth)
	if depth == 0 {
		return int(pad[0])
	}
	return recurse(depth-1) + int(pad[depth%1024])
}

func main() {
	url := flag.String("url", "", "server base URL, e.g. https://127.0.0.1:8443")
	n := flag.Int("n", 1, "requests")
	conc := flag.Int("c", 1, "concurrent workers")
	reqSize := flag.Int("req", 100, "request body bytes")
	respSize := flag.Int("resp", 100, "response body bytes")
	h2 := flag.Bool("h2", false, "offer HTTP/2 through ALPN")
	depth := flag.Int("recurse", 0, "recursion depth between requests (stack growth)")
	flag.Parse()

	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		ForceAttemptHTTP2: *h2,
		MaxIdleConnsPerHost: *conc,
	}
	if !*h2 {
		// a non-nil empty map turns HTTP/2 off for this transport
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	client := &http.Client{Transport: tr}

	lines := make([]string, *n)
	var failed bool
	var mu sync.Mutex
	var wg sync.WaitGroup
	jobs := make(chan int)
	for w := 0; w < *conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				if *depth > 0 {
					recurse(*depth + i%7*100)
				}
				body := pattern(*reqSize, i)
				u := fmt.Sprintf("%s/echo?size=%d&seed=%d", *url, *respSize, i)
				resp, err := client.Post(u, "application/octet-stream", bytes.NewReader(body))
				if err != nil {
					mu.Lock()
					failed = true
					lines[i] = fmt.Sprintf("%d error %v", i, err)
					mu.Unlock()
					continue
				}
				got, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				want := pattern(*respSize, i)
				sum := sha256.Sum256(got)
				ok := err == nil && bytes.Equal(got, want) &&
					resp.Header.Get("X-Request-Sha256") == hexsum(body)
				mu.Lock()
				if !ok {
					failed = true
				}
				lines[i] = fmt.Sprintf("%d %s %d %s ok=%v", i, resp.Proto, len(got), hex.EncodeToString(sum[:8]), ok)
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < *n; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	for _, l := range lines {
		fmt.Println(l)
	}
	if failed {
		os.Exit(1)
	}
}

func hexsum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
