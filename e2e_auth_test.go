package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// authAddr is a non-loopback address the tests put on lo, so that the
// registry is spoken to over HTTPS like a remote one (loopback registries
// get plain HTTP).
const authAddr = "192.0.2.2"

const authUser, authPass = "alice", "s3cret"

// testCA is a certificate authority made by the test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newCA(t *testing.T) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "stargz-mount test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue makes a leaf certificate for ip (or a signing certificate if ip is
// nil) and returns its DER, PEM and key PEM.
func (ca *testCA) issue(t *testing.T, cn string, ip net.IP) (der, certPEM, keyPEM []byte, key *ecdsa.PrivateKey) {
	t.Helper()
	key, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	return der, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), key
}

// addAuthAddr puts authAddr on lo for the test.
func addAuthAddr(t *testing.T) {
	t.Helper()
	out, err := exec.Command("ip", "addr", "add", authAddr+"/32", "dev", "lo").CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "File exists") {
			return // another test run holds it; it removes it
		}
		t.Skipf("cannot add %s to lo: %v: %s", authAddr, err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "addr", "del", authAddr+"/32", "dev", "lo").Run() })
}

func freeAuthPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", authAddr+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startAuthRegistry runs Debian's docker-registry on authAddr over TLS
// with the given auth section and returns its host:port.
func startAuthRegistry(t *testing.T, ca *testCA, authYAML string) string {
	t.Helper()
	if _, err := os.Stat(lt.DistributionBinary); err != nil {
		t.Skipf("needs %s (Debian's docker-registry)", lt.DistributionBinary)
	}
	dir := t.TempDir()
	_, certPEM, keyPEM, _ := ca.issue(t, authAddr, net.ParseIP(authAddr))
	os.WriteFile(filepath.Join(dir, "server.crt"), append(certPEM, ca.pem...), 0o600)
	os.WriteFile(filepath.Join(dir, "server.key"), keyPEM, 0o600)
	host := fmt.Sprintf("%s:%d", authAddr, freeAuthPort(t))
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s/storage
http:
  addr: %s
  secret: test
  tls:
    certificate: %s/server.crt
    key: %s/server.key
auth:
%s`, dir, host, dir, dir, authYAML)
	os.WriteFile(filepath.Join(dir, "config.yml"), []byte(cfg), 0o600)
	logf, _ := os.Create(filepath.Join(dir, "registry.log"))
	cmd := exec.Command(lt.DistributionBinary, "serve", filepath.Join(dir, "config.yml"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "registry.log"))
			t.Logf("registry log:\n%s", b)
		}
	})
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	for deadline := time.Now().Add(10 * time.Second); ; {
		resp, err := client.Get("https://" + host + "/v2/")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("registry at %s not up: %v", host, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return host
}

// pushTLS pushes img to ref with the test's credentials and CA.
func pushTLS(t *testing.T, ca *testCA, img v1.Image, ref string) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	if err := remote.Write(r, img, remote.WithTransport(tr),
		remote.WithAuth(authn.FromConfig(authn.AuthConfig{Username: authUser, Password: authPass}))); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// authImage is an image of files big enough that each read of a new one
// needs a request of its own.
func authImage(t *testing.T, n int) (v1.Image, map[string][]byte) {
	t.Helper()
	files := map[string][]byte{}
	entries := []lt.Entry{lt.Dir("d")}
	for i := range n {
		name := fmt.Sprintf("d/f%02d", i)
		files[name] = lt.Random(name, 2<<20)
		entries = append(entries, lt.File(name, files[name]))
	}
	img, err := lt.BuildImage(256<<10, entries)
	if err != nil {
		t.Fatal(err)
	}
	return img, files
}

// mountWith mounts ref with extra environment and flags and returns the
// command's output and error.
func (e *env) mountWith(envv []string, ref string, flags ...string) ([]byte, error) {
	cmd := e.cmd(append(append(flags, "--daemon"), ref, e.target)...)
	cmd.Env = append(os.Environ(), envv...)
	return cmd.CombinedOutput()
}

func authEntry(host string) []byte {
	a := base64.StdEncoding.EncodeToString([]byte(authUser + ":" + authPass))
	return []byte(fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, host, a))
}

func TestAuthBasicTLS(t *testing.T) {
	needFUSE(t)
	if _, err := exec.LookPath("htpasswd"); err != nil {
		t.Skip("needs htpasswd (Debian package apache2-utils)")
	}
	addAuthAddr(t)
	ca := newCA(t)
	dir := t.TempDir()
	hp := filepath.Join(dir, "htpasswd")
	if out, err := exec.Command("htpasswd", "-Bbc", hp, authUser, authPass).CombinedOutput(); err != nil {
		t.Fatalf("htpasswd: %v: %s", err, out)
	}
	host := startAuthRegistry(t, ca, fmt.Sprintf("  htpasswd:\n    realm: test\n    path: %s\n", hp))
	img, files := authImage(t, 2)
	ref := host + "/app:1"
	pushTLS(t, ca, img, ref)
	caFile := filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, ca.pem, 0o644)

	home := t.TempDir() // no credentials of the machine's user
	clean := []string{"HOME=" + home, "DOCKER_CONFIG=", "REGISTRY_AUTH_FILE=", "XDG_RUNTIME_DIR=", "XDG_CONFIG_HOME="}
	dockerDir := filepath.Join(dir, "docker")
	os.MkdirAll(dockerDir, 0o700)
	os.WriteFile(filepath.Join(dockerDir, "config.json"), authEntry(host), 0o600)
	runDir := filepath.Join(dir, "run")
	os.MkdirAll(filepath.Join(runDir, "containers"), 0o700)
	os.WriteFile(filepath.Join(runDir, "containers", "auth.json"), authEntry(host), 0o600)

	tests := []struct {
		name  string
		env   []string
		flags []string
		want  string // in the error; "" means the mount works
	}{
		{name: "docker config", env: []string{"DOCKER_CONFIG=" + dockerDir}},
		{name: "podman auth.json", env: []string{"XDG_RUNTIME_DIR=" + runDir}},
		{name: "--creds", flags: []string{"--creds", authUser + ":" + authPass}},
		{name: "wrong --creds", flags: []string{"--creds", authUser + ":wrong"}, want: "unauthorized"},
		{name: "no credentials", want: "unauthorized"},
		{name: "no CA", flags: []string{"--creds", authUser + ":" + authPass}, want: "certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			flags := tt.flags
			if tt.name != "no CA" {
				flags = append([]string{"--ca-file", caFile}, flags...)
			}
			out, err := e.mountWith(append(append([]string(nil), clean...), tt.env...), ref, flags...)
			if tt.want != "" {
				if err == nil {
					e.umount()
					t.Fatalf("mount succeeded, want an error with %q", tt.want)
				}
				if !strings.Contains(string(out), tt.want) {
					t.Errorf("error %q does not say %q", out, tt.want)
				}
				e.assertClean()
				return
			}
			if err != nil {
				t.Fatalf("mount: %v\n%s", err, out)
			}
			got, err := os.ReadFile(filepath.Join(e.target, "d/f01"))
			if err != nil || !bytes.Equal(got, files["d/f01"]) {
				t.Errorf("read through the mount: %v", err)
			}
			e.umount()
			e.assertClean()
		})
	}
}

// tokenServer issues registry bearer tokens (ES256 JWTs with an x5c chain
// to the test CA) to alice, valid for ttl, and counts them.
type tokenServer struct {
	ca      *testCA
	certDER []byte
	key     *ecdsa.PrivateKey
	ttl     time.Duration
	issued  atomic.Int64
}

// leeway is the clock skew distribution 2.8 grants a token past its expiry.
const leeway = 60 * time.Second

func (ts *tokenServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if u, p, ok := r.BasicAuth(); !ok || u != authUser || p != authPass {
		http.Error(w, "bad credentials", http.StatusUnauthorized)
		return
	}
	var access []map[string]any
	for _, s := range r.URL.Query()["scope"] {
		parts := strings.Split(s, ":")
		if len(parts) == 3 {
			access = append(access, map[string]any{"type": parts[0], "name": parts[1], "actions": strings.Split(parts[2], ",")})
		}
	}
	now := time.Now()
	// The registry accepts a token until leeway past its exp: backdate exp
	// so the token really lives ttl.
	exp := now.Add(ts.ttl - leeway)
	claims := map[string]any{
		"iss": "test-issuer", "sub": authUser, "aud": r.URL.Query().Get("service"),
		"exp": exp.Unix(), "nbf": now.Add(-2 * leeway).Unix(), "iat": now.Add(-2 * leeway).Unix(),
		"jti": fmt.Sprint(ts.issued.Add(1)), "access": access,
	}
	header := map[string]any{"typ": "JWT", "alg": "ES256", "x5c": []string{base64.StdEncoding.EncodeToString(ts.certDER)}}
	enc := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	signing := enc(header) + "." + enc(claims)
	sum := sha256.Sum256([]byte(signing))
	rr, ss, err := ecdsa.Sign(rand.Reader, ts.key, sum[:])
	if err != nil {
		http.Error(w, err.Error(), 500)
		return
	}
	sig := make([]byte, 64)
	rr.FillBytes(sig[:32])
	ss.FillBytes(sig[32:])
	tok := signing + "." + base64.RawURLEncoding.EncodeToString(sig)
	json.NewEncoder(w).Encode(map[string]any{"token": tok, "access_token": tok, "expires_in": int(ts.ttl.Seconds()), "issued_at": now.Format(time.RFC3339)})
}

func TestAuthTokenRefresh(t *testing.T) {
	needFUSE(t)
	addAuthAddr(t)
	ca := newCA(t)
	der, _, _, key := ca.issue(t, "token signer", nil)
	ts := &tokenServer{ca: ca, certDER: der, key: key, ttl: 3 * time.Second}
	// The realm of a registry spoken to over HTTPS must be HTTPS too, and
	// not on a loopback or private address (go-containerregistry refuses
	// those as an SSRF guard).
	tsrv := httptest.NewUnstartedServer(ts)
	ln, err := net.Listen("tcp", authAddr+":0")
	if err != nil {
		t.Fatal(err)
	}
	tsrv.Listener.Close()
	tsrv.Listener = ln
	_, certPEM, keyPEM, _ := ca.issue(t, "token server", net.ParseIP(authAddr))
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	tsrv.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
	tsrv.StartTLS()
	t.Cleanup(tsrv.Close)
	dir := t.TempDir()
	bundle := filepath.Join(dir, "token-ca.pem")
	os.WriteFile(bundle, ca.pem, 0o644)
	host := startAuthRegistry(t, ca, fmt.Sprintf("  token:\n    realm: %s/token\n    service: test-registry\n    issuer: test-issuer\n    rootcertbundle: %s\n", tsrv.URL, bundle))
	img, files := authImage(t, 8)
	ref := host + "/app:1"
	pushTLS(t, ca, img, ref)
	caFile := filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, ca.pem, 0o644)

	e := newEnv(t)
	// No background fetch: every file read below must go to the registry.
	out, err := e.mountWith([]string{"HOME=" + t.TempDir()}, ref, "--ca-file", caFile, "--creds", authUser+":"+authPass,
		"--background-fetch=false")
	if err != nil {
		t.Fatalf("mount: %v\n%s", err, out)
	}
	start, first := time.Now(), ts.issued.Load()
	// One new file a second, for well past the first token's life.
	for i := range 8 {
		time.Sleep(time.Until(start.Add(time.Duration(i) * time.Second)))
		name := fmt.Sprintf("d/f%02d", i)
		got, err := os.ReadFile(filepath.Join(e.target, name))
		if err != nil || !bytes.Equal(got, files[name]) {
			t.Errorf("read %s %s after mounting: %v", name, time.Since(start).Round(time.Millisecond), err)
		}
	}
	if n := ts.issued.Load() - first; n < 1 {
		t.Errorf("no token issued while reading for 7 s with %s tokens: the mount did not refresh", ts.ttl)
	}
	e.umount()
	e.assertClean()
}
