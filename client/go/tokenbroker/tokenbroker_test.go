package tokenbroker_test

// The library against the real broker and the real fake upstream (started from $TB_BUILD_DIR):
// the loop, a 429 moving the request to another account and cooling the first, RESOURCE_EXHAUSTED
// waited out within the deadline and given up past it, failures in fn still reported, TLS with a
// bearer token, and the ≤ 30-line example proxy (serve_example).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tokenbroker/client/go/tokenbroker"
	tokenbrokerv1 "tokenbroker/proto/tokenbroker/v1"
)

const (
	callerToken = "go-caller-token-0123456789abcdef"
	quota429    = `{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"You have exhausted your capacity on this model.",` +
		`"details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"QUOTA_EXHAUSTED","metadata":{"quotaResetDelay":"1h"}}]}}`
)

var (
	buildDir   = os.Getenv("TB_BUILD_DIR")
	env        *cluster
	tcpTarget  string
	unixTarget string
	tlsTarget  string
)

func TestMain(m *testing.M) {
	runtime.LockOSThread() // the processes' Pdeathsig follows this thread: it lives as long as the binary
	if buildDir == "" {
		fmt.Fprintln(os.Stderr, "TB_BUILD_DIR must name the build folder (with server/tokenbroker and tests/fakes/fake_upstream)")
		os.Exit(2)
	}
	code, err := run(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "setup:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func run(m *testing.M) (int, error) {
	var err error
	env, err = newCluster(buildDir)
	defer env.close() // stops every process and removes the folder, also when setup failed
	if err != nil {
		return 0, err
	}
	if tcpTarget, err = env.startBroker(buildDir, "127.0.0.1:0"); err != nil {
		return 0, err
	}
	if unixTarget, err = env.startBroker(buildDir, "unix:"+filepath.Join(env.dir, "broker.sock")); err != nil {
		return 0, err
	}
	if err = pki(env.dir); err != nil {
		return 0, err
	}
	callers := filepath.Join(env.dir, "callers.txt")
	if err = os.WriteFile(callers, []byte("proxy-go "+callerToken+"\n"), 0o600); err != nil {
		return 0, err
	}
	tlsTarget, err = env.startBroker(buildDir, "127.0.0.1:0", "--caller_tokens_file="+callers,
		"--tls_cert_file="+filepath.Join(env.dir, "server.pem"), "--tls_key_file="+filepath.Join(env.dir, "server.key"),
		"--tls_client_ca_file="+filepath.Join(env.dir, "ca.pem"))
	if err != nil {
		return 0, err
	}
	return m.Run(), nil
}

func dial(t *testing.T, target string, opts ...tokenbroker.Option) *tokenbroker.Client {
	t.Helper()
	c, err := tokenbroker.Dial(target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// callUpstream is a fn of Do: generateContent on the fake upstream with the token.
func callUpstream(seen *[]string) tokenbroker.Func {
	return func(ctx context.Context, token string, account tokenbroker.Account) (*http.Response, error) {
		*seen = append(*seen, account.ID)
		req, err := http.NewRequestWithContext(ctx, "POST", env.upstreamURL()+"/v1internal:generateContent",
			strings.NewReader(`{"project":"`+account.ProjectID+`","request":{}}`))
		if err != nil {
			return nil, err
		}
		req.Header.Set("Authorization", "Bearer "+token)
		return http.DefaultClient.Do(req)
	}
}

// account is the broker's view of one account (ListAccounts; the test brokers are open).
func account(t *testing.T, c *tokenbroker.Client, id string) *tokenbrokerv1.Account {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	list, err := c.ListAccounts(ctx, &tokenbrokerv1.ListAccountsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range list.GetAccounts() {
		if a.GetAccountId() == id {
			return a
		}
	}
	t.Fatalf("no account %s", id)
	return nil
}

func cooledFor(a *tokenbrokerv1.Account, model string) bool {
	for _, cd := range a.GetCooldowns() {
		if cd.GetModel() == model {
			return true
		}
	}
	return false
}

func readAll(t *testing.T, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestDoServesThroughTheBrokerOverTCPAndUnixSocket(t *testing.T) {
	for name, target := range map[string]string{"tcp": tcpTarget, "unix": unixTarget} {
		t.Run(name, func(t *testing.T) {
			c := dial(t, target)
			var seen []string
			resp, err := c.Do(context.Background(), "go-happy-"+name, "conv-1", callUpstream(&seen))
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != 200 || !strings.Contains(readAll(t, resp), "candidates") {
				t.Fatalf("answer %d", resp.StatusCode)
			}
			if len(seen) != 1 || seen[0] != "ultra" {
				t.Fatalf("accounts used %v, want [ultra]", seen)
			}
			if n := account(t, c, "ultra").GetInflightLeases(); n != 0 {
				t.Fatalf("%d leases still in flight: the success was not reported", n)
			}
		})
	}
}

func TestA429IsReportedAndTheRequestRotatesToAnotherAccount(t *testing.T) {
	c := dial(t, tcpTarget)
	model := "go-rotate"
	env.script(t, map[string]any{"path": "/v1internal:generateContent", "match": "1//rt-ultra", "status": 429,
		"body": quota429, "times": 1})
	var seen []string
	resp, err := c.Do(context.Background(), model, "conv-rotate", callUpstream(&seen))
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || strings.Join(seen, ",") != "ultra,pro" {
		t.Fatalf("answer %d after accounts %v, want 200 after ultra,pro", resp.StatusCode, seen)
	}
	resp.Body.Close()
	// The report cooled ultra for this model (for the hour the body named), not for others.
	if !cooledFor(account(t, c, "ultra"), model) {
		t.Fatalf("ultra is not cooling for %s", model)
	}
	for m, want := range map[string]string{model: "pro", model + "-other": "ultra"} {
		grant, err := c.GetToken(context.Background(), &tokenbrokerv1.GetTokenRequest{Model: m})
		if err != nil {
			t.Fatal(err)
		}
		if grant.GetAccountId() != want {
			t.Fatalf("GetToken(%s) chose %s, want %s", m, grant.GetAccountId(), want)
		}
		c.ReportOutcome(context.Background(), &tokenbrokerv1.ReportOutcomeRequest{LeaseId: grant.GetLeaseId(), HttpStatus: 200})
	}
}

func TestAfterMaxAttemptsTheLastAnswerIsReturnedWithItsBody(t *testing.T) {
	c := dial(t, tcpTarget, tokenbroker.WithMaxAttempts(2))
	env.script(t, map[string]any{"path": "/v1internal:generateContent", "status": 503,
		"body": `{"error":{"code":503,"message":"backend unavailable"}}`, "times": 2})
	var seen []string
	resp, err := c.Do(context.Background(), "go-attempts", "", callUpstream(&seen))
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 503 || len(seen) != 2 || seen[0] == seen[1] {
		t.Fatalf("answer %d after accounts %v, want 503 after two different accounts", resp.StatusCode, seen)
	}
	if body := readAll(t, resp); !strings.Contains(body, "backend unavailable") {
		t.Fatalf("the body was not kept: %q", body)
	}
}

// coolBoth cools ultra and pro for model, for the given Retry-After seconds.
func coolBoth(t *testing.T, c *tokenbroker.Client, model, ultra, pro string) {
	t.Helper()
	for id, delay := range map[string]string{"ultra": ultra, "pro": pro} {
		_, err := c.ReportOutcome(context.Background(), &tokenbrokerv1.ReportOutcomeRequest{
			AccountId: id, Model: model, HttpStatus: 429, RetryAfter: delay})
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestResourceExhaustedIsWaitedOutWithinTheDeadline(t *testing.T) {
	c := dial(t, tcpTarget)
	model := "go-wait"
	coolBoth(t, c, model, "600", "2")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	start := time.Now()
	var seen []string
	resp, err := c.Do(ctx, model, "", callUpstream(&seen))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if elapsed := time.Since(start); elapsed < time.Second || elapsed > 10*time.Second {
		t.Fatalf("served after %v, want after pro's 2 s cooldown", elapsed)
	}
	if strings.Join(seen, ",") != "pro" || resp.StatusCode != 200 {
		t.Fatalf("answer %d after accounts %v, want 200 from pro", resp.StatusCode, seen)
	}
}

func TestResourceExhaustedPastTheDeadlineGivesUpAtOnce(t *testing.T) {
	c := dial(t, tcpTarget)
	model := "go-give-up"
	coolBoth(t, c, model, "600", "60")
	for name, opts := range map[string]struct {
		deadline time.Duration
		client   *tokenbroker.Client
	}{
		"caller's deadline": {3 * time.Second, c},
		"max wait":          {0, dial(t, tcpTarget, tokenbroker.WithMaxWait(5*time.Second))},
	} {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			if opts.deadline > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, opts.deadline)
				defer cancel()
			}
			start := time.Now()
			var seen []string
			_, err := opts.client.Do(ctx, model, "", callUpstream(&seen))
			if status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("got %v, want RESOURCE_EXHAUSTED", err)
			}
			if d, ok := tokenbroker.RetryDelay(err); !ok || d < 50*time.Second {
				t.Fatalf("RetryInfo %v %v, want about 60 s", d, ok)
			}
			if elapsed := time.Since(start); elapsed > time.Second {
				t.Fatalf("gave up after %v: it should not wait for what comes too late", elapsed)
			}
			if len(seen) != 0 {
				t.Fatalf("fn was called for %v", seen)
			}
		})
	}
}

func TestFailuresInFnAreStillReported(t *testing.T) {
	c := dial(t, tcpTarget)
	boom := errors.New("boom")
	noLeaseLeft := func(t *testing.T, model string) {
		t.Helper()
		a := account(t, c, "ultra")
		if a.GetInflightLeases() != 0 {
			t.Fatalf("%d leases in flight: the failure was not reported", a.GetInflightLeases())
		}
		if cooledFor(a, model) {
			t.Fatalf("a failure of the caller's own cooled ultra for %s", model)
		}
	}

	t.Run("error", func(t *testing.T) {
		_, err := c.Do(context.Background(), "go-error", "", func(context.Context, string, tokenbroker.Account) (*http.Response, error) {
			return nil, boom
		})
		if !errors.Is(err, boom) {
			t.Fatalf("got %v, want fn's error", err)
		}
		noLeaseLeft(t, "go-error")
	})
	t.Run("panic", func(t *testing.T) {
		func() {
			defer func() {
				if r := recover(); r != boom {
					t.Fatalf("recovered %v, want fn's panic", r)
				}
			}()
			c.Do(context.Background(), "go-panic", "", func(context.Context, string, tokenbroker.Account) (*http.Response, error) {
				panic(boom)
			})
		}()
		noLeaseLeft(t, "go-panic")
	})
	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		_, err := c.Do(ctx, "go-cancel", "", func(ctx context.Context, _ string, _ tokenbroker.Account) (*http.Response, error) {
			cancel() // the proxy's client went away while the upstream call ran
			<-ctx.Done()
			return nil, ctx.Err()
		})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
		noLeaseLeft(t, "go-cancel")
	})
}

func TestTLSWithABearerToken(t *testing.T) {
	pem := func(name string) string { return filepath.Join(env.dir, name) }
	c := dial(t, tlsTarget, tokenbroker.WithTLS(pem("ca.pem"), pem("client.pem"), pem("client.key")),
		tokenbroker.WithTokenSource(func(context.Context) (string, error) { return callerToken, nil }))
	var seen []string
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := c.Do(ctx, "go-tls", "", callUpstream(&seen))
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("answer %d", resp.StatusCode)
	}
	resp.Body.Close()

	noToken := dial(t, tlsTarget, tokenbroker.WithTLS(pem("ca.pem"), pem("client.pem"), pem("client.key")))
	if _, err := noToken.Do(ctx, "go-tls", "", callUpstream(&seen)); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("without a token: %v, want UNAUTHENTICATED", err)
	}
	noCert := dial(t, tlsTarget, tokenbroker.WithTLS(pem("ca.pem"), "", ""), tokenbroker.WithBearerToken(callerToken))
	if _, err := noCert.Do(ctx, "go-tls", "", callUpstream(&seen)); status.Code(err) != codes.Unavailable {
		t.Fatalf("without a client certificate: %v, want UNAVAILABLE", err)
	}
	if _, err := tokenbroker.Dial(tlsTarget, tokenbroker.WithTLS(pem("missing.pem"), "", "")); err == nil {
		t.Fatal("Dial accepted a CA file that does not exist")
	}
}

// The README's Go example, built and run: it serves requests through the broker to the fake
// upstream, and the upstream's 429s cool the account.
func TestServeExample(t *testing.T) {
	src := filepath.Join("..", "serve_example", "main.go")
	raw, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(raw), "\n"); n > 30 {
		t.Fatalf("serve_example is %d lines, the promise is at most 30", n)
	}
	bin := filepath.Join(t.TempDir(), "serve_example")
	if out, err := exec.Command("go", "build", "-o", bin, "tokenbroker/client/go/serve_example").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	runtime.LockOSThread() // this thread ends with the test, and the example with it (Pdeathsig)
	proxy := exec.Command(bin, tcpTarget, env.upstreamURL(), addr)
	proxy.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Process.Kill(); proxy.Wait() })
	if err := waitFor("serve_example to listen", 10*time.Second, func() (bool, error) {
		conn, err := net.Dial("tcp", addr)
		if err == nil {
			conn.Close()
		}
		return err == nil, nil
	}); err != nil {
		t.Fatal(err)
	}

	model := "go-example"
	env.script(t, map[string]any{"path": "/v1internal:generateContent", "match": "1//rt-ultra", "status": 429,
		"body": quota429, "times": 1})
	for i := 0; i < 3; i++ {
		resp, err := http.Post("http://"+addr+"/v1internal:generateContent?model="+model, "application/json",
			strings.NewReader(`{"request":{}}`))
		if err != nil {
			t.Fatal(err)
		}
		var answer map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&answer); err != nil || resp.StatusCode != 200 || answer["response"] == nil {
			t.Fatalf("request %d: answer %d %v (%v)", i, resp.StatusCode, answer, err)
		}
		resp.Body.Close()
	}
	c := dial(t, tcpTarget)
	if !cooledFor(account(t, c, "ultra"), model) {
		t.Fatalf("the upstream's 429 did not cool ultra for %s", model)
	}
	if cooledFor(account(t, c, "pro"), model) {
		t.Fatalf("pro is cooling for %s, but it answered 200", model)
	}
}
