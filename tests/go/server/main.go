// TLS test server for the GnuTLS and Go capture tests, built at test time.
// Offers h2 and http/1.1 through ALPN with a certificate made at start-up.
//
//	/echo?size=N&seed=S  answers N bytes of pattern(N, S) (see tests/go/pattern.py)
//	                     and the SHA-256 of the request body in X-Request-Sha256.
//
// Prints "listening PORT" once ready; the certificate goes to -cert if given.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"
)

func pattern(n int, seed int) []byte {
	b := make([]byte, 0, n+sha256.Size)
	for blk := 0; len(b) < n; blk++ {
		s := sha256.Sum256([]byte(fmt.Sprintf("%d:%d", seed, blk)))
		b = append(b, s[:]...)
	}
	return b[:n]
}

func selfSigned(certOut string) tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		log.Fatal(err)
	}
	tmpl := x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, &key.PublicKey, key)
	if err != nil {
		log.Fatal(err)
	}
	if certOut != "" {
		pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		if err := os.WriteFile(certOut, pemBytes, 0o644); err != nil {
			log.Fatal(err)
		}
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func echo(w http.ResponseWriter, r *http.Request) {
	h := sha256.New()
	if _, err := io.Copy(h, r.Body); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	size, _ := strconv.Atoi(r.URL.Query().Get("size"))
	seed, _ := strconv.Atoi(r.URL.Query().Get("seed"))
	body := pattern(size, seed)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set("X-Request-Sha256", hex.EncodeToString(h.Sum(nil)))
	w.Write(body)
}

func main() {
	certOut := flag.String("cert", "", "write the server certificate (PEM) here")
	h1only := flag.Bool("h1", false, "offer only http/1.1")
	flag.Parse()
	cfg := &tls.Config{Certificates: []tls.Certificate{selfSigned(*certOut)}}
	if *h1only {
		cfg.NextProtos = []string{"http/1.1"}
	} else {
		cfg.NextProtos = []string{"h2", "http/1.1"}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/echo", echo)
	srv := &http.Server{Handler: mux, TLSConfig: cfg}
	fmt.Printf("listening %d\n", ln.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	log.Fatal(srv.ServeTLS(ln, "", ""))
}
