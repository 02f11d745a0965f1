// A proxy frontend on tokenbroker. Usage: serve_example BROKER UPSTREAM LISTEN; then POST to LISTEN/PATH?model=M.
package main

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"

	"tokenbroker/client/go/tokenbroker"
)

func main() {
	broker, err := tokenbroker.Dial(os.Args[1], tokenbroker.WithBearerToken(os.Getenv("TOKENBROKER_TOKEN")))
	if err != nil {
		panic(err)
	}
	panic(http.ListenAndServe(os.Args[3], http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		resp, err := broker.Do(r.Context(), r.URL.Query().Get("model"), r.Header.Get("X-Session-Id"),
			func(ctx context.Context, token string, account tokenbroker.Account) (*http.Response, error) {
				req, _ := http.NewRequestWithContext(ctx, "POST", os.Args[2]+r.URL.Path, bytes.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+token)
				return http.DefaultClient.Do(req)
			})
		tokenbroker.Forward(w, resp, err) // the upstream's answer, or 429/503 from the broker
	})))
}
