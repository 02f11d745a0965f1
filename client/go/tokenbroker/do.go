package tokenbroker

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	tokenbrokerv1 "tokenbroker/proto/tokenbroker/v1"
)

// Account is the account a token of Do belongs to, as GetToken answered.
type Account struct {
	ID         string             // the account file's name without ".json"
	Email      string             // the Google account
	ProjectID  string             // its Cloud Code project; "" when it has none
	Tier       tokenbrokerv1.Tier // ULTRA, PRO, FREE
	LeaseID    string             // what Do reports the answer against
	ExpireTime time.Time          // when the token expires
}

// Func is the caller's own call to Google with token, an access token of account. It returns the
// upstream's answer; an error means there was none (the request failed, the context ended).
type Func func(ctx context.Context, token string, account Account) (*http.Response, error)

// StatusNoAnswer is the status Do reports when fn gave no answer (it returned an error, panicked,
// or its context ended): a 4xx, so the broker ends the lease and cools nothing down.
const StatusNoAnswer = 499

const (
	maxServerWait  = 10 * time.Minute       // the broker's limit on GetToken's max_wait
	deadlineMargin = 200 * time.Millisecond // a waiting GetToken answers this long before the deadline
	maxWaits       = 3                      // RESOURCE_EXHAUSTED answers one GetToken waits out
	maxRetryAfter  = 256                    // bytes of Retry-After the broker takes
	maxErrorBody   = 64 << 10               // bytes of error body the broker takes
)

// Retryable reports whether another account may answer an upstream status differently: 429
// (quota), 401 and 403 (this account's token or standing), 5xx (this account's backend). Any other
// status is the request's own and goes back to the caller as it is.
func Retryable(httpStatus int) bool {
	switch httpStatus {
	case http.StatusUnauthorized, http.StatusForbidden, http.StatusTooManyRequests, http.StatusInternalServerError,
		http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	}
	return false
}

// Do gets a token for model (and session, "" for none) from the broker, calls fn with it, and
// reports fn's answer (status, Retry-After, and the body of a non-2xx answer) — always: also when
// fn fails, panics or ctx ends, as StatusNoAnswer, so the lease never lingers.
//
// When the answer is Retryable, Do asks again with force_rotate (another account) and calls fn
// again, at most WithMaxAttempts times in all. When every account is cooling, the broker's
// RESOURCE_EXHAUSTED carries the time until one frees (RetryInfo): Do waits for it (the broker
// holds the call and answers as soon as an account frees) if that comes within WithMaxWait and
// ctx's deadline, and otherwise gives up at once with that error.
//
// Do returns fn's last answer — the body of a non-2xx answer is buffered, so it can still be read —
// or, when there was none, the broker's error (a gRPC status: status.Code(err)) or fn's own error.
// The caller closes the response's body.
func (c *Client) Do(ctx context.Context, model, session string, fn Func) (*http.Response, error) {
	waitUntil := time.Now().Add(c.opts.maxWait)
	var last *http.Response
	for attempt := 0; attempt < c.opts.maxAttempts; attempt++ {
		if attempt > 0 && ctx.Err() != nil {
			break
		}
		grant, err := c.acquire(ctx, model, session, attempt > 0, waitUntil)
		if err != nil {
			if last != nil {
				return last, nil // the upstream's answer says more than "no other account now"
			}
			return nil, err
		}
		resp, err := c.try(ctx, grant, fn)
		if last != nil {
			last.Body.Close()
		}
		if err != nil {
			return nil, err
		}
		last = resp
		if !Retryable(resp.StatusCode) {
			break
		}
	}
	return last, nil
}

// acquire is GetToken, waiting out RESOURCE_EXHAUSTED while an account frees in time.
func (c *Client) acquire(ctx context.Context, model, session string, rotate bool,
	waitUntil time.Time) (*tokenbrokerv1.GetTokenResponse, error) {
	req := &tokenbrokerv1.GetTokenRequest{Model: model, SessionId: session, ForceRotate: rotate}
	for waits := 0; ; waits++ {
		callCtx, cancel := c.callContext(ctx, req.GetMaxWait().AsDuration())
		grant, err := c.GetToken(callCtx, req)
		cancel()
		if err == nil {
			return grant, nil
		}
		delay, known := RetryDelay(err)
		if status.Code(err) != codes.ResourceExhausted || !known || waits >= maxWaits {
			return nil, err
		}
		budget := time.Until(waitUntil)
		if deadline, ok := ctx.Deadline(); ok && time.Until(deadline)-deadlineMargin < budget {
			budget = time.Until(deadline) - deadlineMargin
		}
		if delay > budget {
			return nil, err // no account frees in time: say so now rather than at the deadline
		}
		if budget > maxServerWait {
			budget = maxServerWait
		}
		// The broker waits (without a thread) and answers as soon as an account frees, which may be
		// before the delay: another caller's report, a lease ending.
		req.MaxWait = durationpb.New(budget)
	}
}

// callContext bounds a call to the broker by the caller's deadline, or by the RPC timeout plus the
// time the broker was asked to wait.
func (c *Client) callContext(ctx context.Context, wait time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.opts.rpcTimeout+wait)
}

// try calls fn with grant and reports its answer, whatever happens in fn.
func (c *Client) try(ctx context.Context, grant *tokenbrokerv1.GetTokenResponse, fn Func) (*http.Response, error) {
	reported := false
	defer func() {
		if !reported { // fn panicked: the panic goes on once the lease is reported
			c.report(grant.GetLeaseId(), StatusNoAnswer, "", "no answer: the caller's call panicked")
		}
	}()
	account := Account{ID: grant.GetAccountId(), Email: grant.GetEmail(), ProjectID: grant.GetProjectId(),
		Tier: grant.GetTier(), LeaseID: grant.GetLeaseId(), ExpireTime: grant.GetExpireTime().AsTime()}
	resp, err := fn(ctx, grant.GetAccessToken(), account)
	if err != nil || resp == nil {
		if resp != nil {
			resp.Body.Close() // an answer with an error (a refused redirect) is no answer
		}
		reported = true
		why := "no answer: the caller's call failed"
		if ctx.Err() != nil {
			why = "no answer: the caller's context ended"
		}
		c.report(grant.GetLeaseId(), StatusNoAnswer, "", why)
		if err == nil {
			err = errors.New("tokenbroker: fn returned neither a response nor an error")
		}
		return nil, err
	}
	body := ""
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		// Buffered, so that the caller can still read (or forward) it.
		raw, _ := io.ReadAll(resp.Body) // a body cut short is reported as far as it came
		resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(raw))
		body = truncateUTF8(strings.ToValidUTF8(string(raw), "\uFFFD"), maxErrorBody)
	}
	reported = true
	httpStatus := resp.StatusCode
	if httpStatus < 100 || httpStatus > 599 {
		httpStatus = StatusNoAnswer
	}
	c.report(grant.GetLeaseId(), httpStatus, truncateUTF8(resp.Header.Get("Retry-After"), maxRetryAfter), body)
	return resp, nil
}

// report sends ReportOutcome on a context of its own: a caller that went away still ends its lease
// (and frees a half-open probe) now rather than at the lease timeout.
func (c *Client) report(leaseID string, httpStatus int, retryAfter, body string) {
	ctx, cancel := context.WithTimeout(context.Background(), c.opts.rpcTimeout)
	defer cancel()
	_, err := c.ReportOutcome(ctx, &tokenbrokerv1.ReportOutcomeRequest{
		LeaseId: leaseID, HttpStatus: int32(httpStatus), RetryAfter: retryAfter, ErrorBody: body})
	if err != nil && c.opts.onReportErr != nil {
		c.opts.onReportErr(err)
	}
}

// RetryDelay returns the google.rpc.RetryInfo delay of a broker error: how long until an account
// frees, on RESOURCE_EXHAUSTED.
func RetryDelay(err error) (time.Duration, bool) {
	s, ok := status.FromError(err)
	if !ok {
		return 0, false
	}
	for _, detail := range s.Details() {
		if info, ok := detail.(*errdetails.RetryInfo); ok && info.GetRetryDelay() != nil {
			return info.GetRetryDelay().AsDuration(), true
		}
	}
	return 0, false
}

// truncateUTF8 cuts s to at most n bytes on a character boundary (protobuf strings are UTF-8).
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// hopByHop are headers of one connection, never forwarded (RFC 9110 §7.6.1).
var hopByHop = map[string]bool{"Connection": true, "Keep-Alive": true, "Proxy-Connection": true, "Te": true,
	"Trailer": true, "Transfer-Encoding": true, "Upgrade": true}

// Forward writes what Do returned to w, as a proxy answers its own client: the upstream's answer
// (status, headers, body); for a broker error, 429 with Retry-After when every account is cooling
// (RESOURCE_EXHAUSTED), 503 otherwise; for fn's own error (no answer), 502. It closes resp's body.
func Forward(w http.ResponseWriter, resp *http.Response, err error) {
	if err != nil {
		s, isStatus := status.FromError(err)
		switch {
		case !isStatus:
			http.Error(w, "no answer from the upstream", http.StatusBadGateway) // fn's error may name URLs
		case s.Code() == codes.ResourceExhausted:
			if d, ok := RetryDelay(err); ok {
				w.Header().Set("Retry-After", strconv.FormatInt(int64(math.Ceil(d.Seconds())), 10))
			}
			http.Error(w, s.Message(), http.StatusTooManyRequests)
		default:
			http.Error(w, s.Message(), http.StatusServiceUnavailable)
		}
		return
	}
	defer resp.Body.Close()
	for name, values := range resp.Header {
		if !hopByHop[name] {
			w.Header()[name] = values
		}
	}
	w.WriteHeader(resp.StatusCode)
	io.Copy(w, resp.Body) //nolint:errcheck // the client went away: nothing to tell it
}
