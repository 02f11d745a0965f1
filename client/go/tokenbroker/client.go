// Package tokenbroker is the Go client of tokenbroker: it asks the broker which Google account a
// request should use, and reports what Google answered, so that the broker's cooldowns learn.
//
// The loop a proxy needs is Client.Do:
//
//	broker, err := tokenbroker.Dial("unix:/run/tokenbroker/broker.sock")
//	resp, err := broker.Do(ctx, "gemini-3-pro-high", sessionID,
//		func(ctx context.Context, token string, account tokenbroker.Account) (*http.Response, error) {
//			req, _ := http.NewRequestWithContext(ctx, "POST", upstreamURL, body)
//			req.Header.Set("Authorization", "Bearer "+token)
//			return http.DefaultClient.Do(req)
//		})
//
// The plain RPCs (GetToken, ReportOutcome, ListAccounts, ExplainSelection, ...) are methods of
// Client too, with the client's credentials on every call.
//
// A Client is safe for concurrent use by many goroutines.
package tokenbroker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	tokenbrokerv1 "tokenbroker/proto/tokenbroker/v1"
)

// TokenSource returns the bearer token to send on a call; "" sends none. It is called once per
// RPC, so a rotated token takes effect at the next call.
type TokenSource func(ctx context.Context) (string, error)

type options struct {
	tlsConfig   *tls.Config
	tlsErr      error
	tokens      TokenSource
	maxAttempts int
	maxWait     time.Duration
	rpcTimeout  time.Duration
	onReportErr func(error)
	dialOptions []grpc.DialOption
}

// Option configures Dial.
type Option func(*options)

// WithTLS connects over TLS, trusting the PEM CA in caFile ("" trusts the system's roots). With
// certFile and keyFile the client presents that certificate (mutual TLS). Files are read by Dial,
// which fails when one cannot be read.
func WithTLS(caFile, certFile, keyFile string) Option {
	return func(o *options) {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if caFile != "" {
			pem, err := os.ReadFile(caFile)
			if err != nil {
				o.tlsErr = fmt.Errorf("tokenbroker: TLS CA: %w", err)
				return
			}
			cfg.RootCAs = x509.NewCertPool()
			if !cfg.RootCAs.AppendCertsFromPEM(pem) {
				o.tlsErr = fmt.Errorf("tokenbroker: TLS CA: no PEM certificate in %s", caFile)
				return
			}
		}
		if certFile != "" || keyFile != "" {
			cert, err := tls.LoadX509KeyPair(certFile, keyFile)
			if err != nil {
				o.tlsErr = fmt.Errorf("tokenbroker: TLS client certificate: %w", err)
				return
			}
			cfg.Certificates = []tls.Certificate{cert}
		}
		o.tlsConfig = cfg
	}
}

// WithTLSConfig connects over TLS with cfg.
func WithTLSConfig(cfg *tls.Config) Option { return func(o *options) { o.tlsConfig = cfg } }

// WithBearerToken sends "authorization: Bearer <token>" on every call (the broker's
// --caller_tokens_file); "" sends none, so WithBearerToken(os.Getenv("TOKENBROKER_TOKEN")) is fine.
func WithBearerToken(token string) Option {
	return WithTokenSource(func(context.Context) (string, error) { return token, nil })
}

// WithTokenSource asks src for the bearer token before every call.
func WithTokenSource(src TokenSource) Option { return func(o *options) { o.tokens = src } }

// WithMaxAttempts bounds how many accounts Do tries for one request (default 3, at least 1).
func WithMaxAttempts(n int) Option { return func(o *options) { o.maxAttempts = n } }

// WithMaxWait bounds how long Do waits, in all, for an account to free when every account is
// cooling (default 30 s; 0 never waits). The caller's deadline bounds it too.
func WithMaxWait(d time.Duration) Option { return func(o *options) { o.maxWait = d } }

// WithRPCTimeout sets the deadline of each call to the broker when the caller's context has none
// (default 30 s; a GetToken that waits for an account gets its wait on top).
func WithRPCTimeout(d time.Duration) Option { return func(o *options) { o.rpcTimeout = d } }

// WithReportErrorHandler is called when Do could not report an outcome (the broker unreachable);
// Do returns the upstream's answer all the same. Default: such errors are dropped.
func WithReportErrorHandler(f func(error)) Option { return func(o *options) { o.onReportErr = f } }

// WithDialOptions passes extra options to grpc.Dial.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOptions = append(o.dialOptions, opts...) }
}

// Client talks to one broker. The embedded TokenBrokerServiceClient gives the plain RPCs.
type Client struct {
	tokenbrokerv1.TokenBrokerServiceClient
	conn *grpc.ClientConn
	opts options
}

// Dial makes a client of the broker at target: "host:port" or "unix:/path.sock". It does not wait
// for the connection; calls do. Plaintext unless WithTLS or WithTLSConfig is given.
func Dial(target string, opts ...Option) (*Client, error) {
	o := options{maxAttempts: 3, maxWait: 30 * time.Second, rpcTimeout: 30 * time.Second}
	for _, opt := range opts {
		opt(&o)
	}
	if o.tlsErr != nil {
		return nil, o.tlsErr
	}
	if o.maxAttempts < 1 {
		o.maxAttempts = 1
	}
	if o.maxWait < 0 {
		return nil, errors.New("tokenbroker: WithMaxWait must not be negative")
	}
	dial := []grpc.DialOption{grpc.WithInsecure()}
	if o.tlsConfig != nil {
		dial = []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(o.tlsConfig))}
	}
	if o.tokens != nil {
		dial = append(dial, grpc.WithPerRPCCredentials(bearer{o.tokens}))
	}
	conn, err := grpc.Dial(target, append(dial, o.dialOptions...)...)
	if err != nil {
		return nil, fmt.Errorf("tokenbroker: dial %s: %w", target, err)
	}
	return &Client{TokenBrokerServiceClient: tokenbrokerv1.NewTokenBrokerServiceClient(conn), conn: conn, opts: o}, nil
}

// Close closes the connection. Calls in flight fail.
func (c *Client) Close() error { return c.conn.Close() }

// bearer puts the caller token on each call. It allows plaintext: a broker on loopback or a unix
// socket takes caller tokens without TLS.
type bearer struct{ src TokenSource }

func (b bearer) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	token, err := b.src(ctx)
	if err != nil {
		return nil, fmt.Errorf("tokenbroker: bearer token: %w", err)
	}
	if token == "" {
		return nil, nil
	}
	return map[string]string{"authorization": "Bearer " + token}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }
