package tokenbroker_test

// The real binaries for the tests: the fake Google upstream and brokers, started from
// $TB_BUILD_DIR on port 0 in a temp folder, stopped (SIGTERM, then SIGKILL) even when a test fails.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// process is a started binary that wrote its port to a file.
type process struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed once cmd.Wait returned
	port   int
}

func (p *process) stop() {
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(what string, timeout time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if err != nil {
			return fmt.Errorf("waiting for %s: %w", what, err)
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func startProcess(dir, name string, argv []string, env []string) (*process, error) {
	portFile := filepath.Join(dir, name+".port")
	logPath := filepath.Join(dir, name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd := exec.Command(argv[0], append(argv[1:], "--port_file", portFile)...)
	cmd.Stdout, cmd.Stderr, cmd.Env = logFile, logFile, env
	// Ends with the test binary even if it crashes (TestMain locks its OS thread, which the signal
	// is tied to, for its whole run).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	p := &process{cmd: cmd, exited: exited}
	err = waitFor(name+" to listen", 15*time.Second, func() (bool, error) {
		select {
		case <-exited:
			out, _ := os.ReadFile(logPath)
			return false, fmt.Errorf("%s exited: %s", name, out)
		default:
		}
		raw, err := os.ReadFile(portFile)
		if err != nil || len(bytes.TrimSpace(raw)) == 0 {
			return false, nil
		}
		p.port, err = strconv.Atoi(strings.TrimSpace(string(raw)))
		return err == nil, err
	})
	if err != nil {
		cmd.Process.Kill()
		<-exited
		return nil, err
	}
	return p, nil
}

// cluster is a temp folder with two accounts (ultra: ULTRA, pro: PRO), the fake upstream, and the
// brokers started on them.
type cluster struct {
	dir      string
	upstream *process
	brokers  []*process
}

func accountJSON(email, refreshToken, tier string) []byte {
	name := strings.Split(email, "@")[0]
	doc := map[string]any{
		"id": name, "email": email, "name": name,
		"token": map[string]any{"access_token": "", "refresh_token": refreshToken, "expires_in": 0,
			"expiry_timestamp": 0, "token_type": "Bearer", "project_id": "proj-" + name},
		"quota":    map[string]any{"models": []any{}, "subscription_tier": tier, "is_forbidden": false},
		"disabled": false, "proxy_disabled": false, "protected_models": []any{},
	}
	out, _ := json.Marshal(doc)
	return out
}

func newCluster(buildDir string) (*cluster, error) {
	dir, err := os.MkdirTemp("", "tokenbroker-go-test-")
	if err != nil {
		return nil, err
	}
	c := &cluster{dir: dir}
	accounts := filepath.Join(dir, "accounts")
	if err := os.Mkdir(accounts, 0o700); err != nil {
		return c, err
	}
	for id, doc := range map[string][]byte{
		"ultra": accountJSON("ultra@example.com", "1//rt-ultra", "ULTRA"),
		"pro":   accountJSON("pro@example.com", "1//rt-pro", "PRO"),
	} {
		if err := os.WriteFile(filepath.Join(accounts, id+".json"), doc, 0o600); err != nil {
			return c, err
		}
	}
	c.upstream, err = startProcess(dir, "fake_upstream", []string{filepath.Join(buildDir, "tests", "fakes", "fake_upstream")},
		os.Environ())
	return c, err
}

func (c *cluster) upstreamURL() string { return fmt.Sprintf("http://127.0.0.1:%d", c.upstream.port) }

// startBroker starts a broker on listen ("127.0.0.1:0" or "unix:..."), returning its target.
func (c *cluster) startBroker(buildDir, listen string, flags ...string) (string, error) {
	n := len(c.brokers) + 1
	argv := append([]string{filepath.Join(buildDir, "server", "tokenbroker"),
		"--accounts_dir", filepath.Join(c.dir, "accounts"), "--listen", listen,
		"--oauth_token_url", c.upstreamURL() + "/token", "--cloudcode_base_url", c.upstreamURL(),
		"--reload_interval", "200ms"}, flags...)
	env := append(os.Environ(), "TOKENBROKER_OAUTH_CLIENT_ID=demo-client", "TOKENBROKER_OAUTH_CLIENT_SECRET=demo-secret")
	p, err := startProcess(c.dir, fmt.Sprintf("broker-%d", n), argv, env)
	if err != nil {
		return "", err
	}
	c.brokers = append(c.brokers, p)
	if strings.HasPrefix(listen, "unix:") {
		return listen, nil
	}
	return fmt.Sprintf("127.0.0.1:%d", p.port), nil
}

// script makes the fake upstream answer the next request(s) of one account as told.
func (c *cluster) script(t *testing.T, rule map[string]any) {
	t.Helper()
	body, _ := json.Marshal(rule)
	resp, err := http.Post(c.upstreamURL()+"/__fake/script", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("/__fake/script answered %d", resp.StatusCode)
	}
}

func (c *cluster) close() {
	for _, p := range append(c.brokers, c.upstream) {
		if p != nil {
			p.stop()
		}
	}
	os.RemoveAll(c.dir)
}

// pki writes a CA, a server certificate for 127.0.0.1/localhost and a client certificate (PEM) to dir.
func pki(dir string) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tokenbroker-go-test-ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(48 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(dir, "ca.pem"), "CERTIFICATE", caDER); err != nil {
		return err
	}
	for i, leaf := range []struct {
		name  string
		usage x509.ExtKeyUsage
	}{{"server", x509.ExtKeyUsageServerAuth}, {"client", x509.ExtKeyUsageClientAuth}} {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: leaf.name},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(48 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{leaf.usage}}
		if leaf.name == "server" {
			tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
			tmpl.DNSNames = []string{"localhost"}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, leaf.name+".pem"), "CERTIFICATE", der); err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, leaf.name+".key"), "PRIVATE KEY", keyDER); err != nil {
			return err
		}
	}
	return nil
}

func writePEM(path, kind string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600)
}

// freePort is a loopback port nobody listens on now (for the example, which takes an address).
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
