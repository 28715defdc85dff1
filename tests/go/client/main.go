// Test client for the Go crypto/tls capture tests: built at test time with
// each Go toolchain, stripped and not. Uses only the standard library.
//
// Each request POSTs a deterministic body to the server's /echo endpoint,
// which answers with a deterministic body of the size asked for. One line per
// request goes to stdout, in request order, so that a run with probes attached
// can be compared with a run without.
package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"sync"
	"time"
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

// deepThen runs f at the bottom of a recursion `depth` frames deep (about 100 B each), so that the
// functions f calls (tls.Conn.Write/Read) start with more or less stack left and, now and then, make
// the runtime grow, i.e. copy, the goroutine stack right in their prologue.
//
//go:noinline
func deepThen(depth int, f func()) int {
	var pad [48]byte
	pad[depth%48] = byte(depth)
	if depth <= 0 {
		f()
		return int(pad[0])
	}
	return deepThen(depth-1, f) + int(pad[depth%48])
}

// rawExchange does one HTTP/1.1 request by hand on conn. Every conn.Write and conn.Read runs in a
// fresh goroutine (a small new stack) at the bottom of a recursion of varying depth, and is the deepest
// call there, so that the stack regularly has to grow in the very prologue of Write or Read.
func rawExchange(conn *tls.Conn, i, depth, reqSize, respSize int) (string, bool) {
	deep := func(d int, f func()) {
		done := make(chan struct{})
		go func() {
			defer close(done)
			deepThen(d, f)
		}()
		<-done
	}
	body := pattern(reqSize, i)
	head := fmt.Sprintf("POST /echo?size=%d&seed=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n"+
		"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n", respSize, i, len(body))
	msg := append([]byte(head), body...)
	var err error
	deep(depth, func() { _, err = conn.Write(msg) })
	if err != nil {
		return fmt.Sprintf("%d error %v", i, err), false
	}
	// read exactly one response: head, then Content-Length bytes
	var got []byte
	buf := make([]byte, 16384)
	want := -1
	for k := 0; want < 0 || len(got) < want; k++ {
		var n int
		deep(depth+k%5, func() { n, err = conn.Read(buf) })
		if err != nil {
			return fmt.Sprintf("%d error %v", i, err), false
		}
		got = append(got, buf[:n]...)
		if end := bytes.Index(got, []byte("\r\n\r\n")); want < 0 && end >= 0 {
			resp, perr := http.ReadResponse(bufio.NewReader(bytes.NewReader(got[:end+4])), nil)
			if perr != nil {
				return fmt.Sprintf("%d error %v", i, perr), false
			}
			want = end + 4 + int(resp.ContentLength)
		}
	}
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(got)), nil)
	if err != nil {
		return fmt.Sprintf("%d error %v", i, err), false
	}
	rbody, err := io.ReadAll(resp.Body)
	sum := sha256.Sum256(rbody)
	ok := err == nil && len(got) == want && bytes.Equal(rbody, pattern(respSize, i)) &&
		resp.Header.Get("X-Request-Sha256") == hexsum(body)
	return fmt.Sprintf("%d %s %d %s ok=%v", i, resp.Proto, len(rbody), hex.EncodeToString(sum[:8]), ok), ok
}

func main() {
	url := flag.String("url", "", "server base URL, e.g. https://127.0.0.1:8443")
	n := flag.Int("n", 1, "requests")
	conc := flag.Int("c", 1, "concurrent workers")
	reqSize := flag.Int("req", 100, "request body bytes")
	respSize := flag.Int("resp", 100, "response body bytes")
	h2 := flag.Bool("h2", false, "offer HTTP/2 through ALPN")
	depth := flag.Int("recurse", 0, "recursion depth between requests (stack growth)")
	raw := flag.Bool("raw", false, "HTTP/1.1 by hand on one tls.Conn per worker, each exchange deep in a recursion")
	delay := flag.Duration("delay", 0, "wait this long before the first request (lets discovery attach first)")
	waitLine := flag.Bool("wait-stdin", false, "wait for a line on stdin before the first request")
	flag.Parse()
	time.Sleep(*delay)
	if *waitLine {
		bufio.NewReader(os.Stdin).ReadString('\n')
	}

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
		if *raw {
			go func(w int) {
				defer wg.Done()
				host := (*url)[len("https://"):]
				conn, err := tls.Dial("tcp", host, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
				if err != nil {
					fmt.Fprintln(os.Stderr, err)
					os.Exit(2)
				}
				defer conn.Close()
				for i := range jobs {
					if w == 0 && i%64 == 0 {
						runtime.GC() // shrinks stacks that grew
					}
					line, ok := rawExchange(conn, i, (i*7)%(*depth+1), *reqSize, *respSize)
					mu.Lock()
					lines[i] = line
					failed = failed || !ok
					mu.Unlock()
				}
			}(w)
			continue
		}
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
