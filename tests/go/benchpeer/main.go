// Both ends of the probe-cost benchmark (bench/capture_stacks.py), built at bench time.
//
//	-serve: TLS server on 127.0.0.1 (certificate made at start-up); prints "listening PORT". A client
//	        that sends 'R' first gets SIZE-byte records written back forever; any other client is read
//	        and discarded.
//	-mode write|read: client doing N tls.Conn.Write calls of SIZE bytes, or N tls.Conn.Read calls of
//	        (at most) one SIZE-byte record each; prints {"ns_per_call": X} for the timed calls only.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"time"
)

func cert() tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		log.Fatal(err)
	}
	tmpl := x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, &key.PublicKey, key)
	if err != nil {
		log.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func serve(size int) {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert()}})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("listening %d\n", ln.Addr().(*net.TCPAddr).Port)
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go func(c net.Conn) {
			defer c.Close()
			first := make([]byte, 1)
			if _, err := io.ReadFull(c, first); err != nil {
				return
			}
			if first[0] != 'R' {
				io.Copy(io.Discard, c)
				return
			}
			buf := make([]byte, size)
			for {
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}(c)
	}
}

func main() {
	srv := flag.Bool("serve", false, "run the server")
	addr := flag.String("addr", "", "server host:port")
	mode := flag.String("mode", "write", "write or read")
	n := flag.Int("n", 20000, "timed calls")
	size := flag.Int("size", 100, "bytes per call")
	flag.Parse()
	if *srv {
		serve(*size)
		return
	}
	c, err := tls.Dial("tcp", *addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, *size)
	op := func() {
		if _, err := c.Write(buf); err != nil {
			log.Fatal(err)
		}
	}
	if *mode == "read" {
		if _, err := c.Write([]byte("R")); err != nil {
			log.Fatal(err)
		}
		op = func() {
			if _, err := c.Read(buf); err != nil {
				log.Fatal(err)
			}
		}
	} else if _, err := c.Write([]byte("W")); err != nil {
		log.Fatal(err)
	}
	for i := 0; i < 200; i++ { // warm up
		op()
	}
	t := time.Now()
	for i := 0; i < *n; i++ {
		op()
	}
	fmt.Printf("{\"ns_per_call\": %f}\n", float64(time.Since(t).Nanoseconds())/float64(*n))
}
