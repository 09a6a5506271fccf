// Command lmserve-example calls a running lmserve: it streams a greedy generation from
// tiny-gpt2 and embeds two texts with tiny-encoder, ending each call with one line in a
// format that every example client shares (tests/python/test_examples.py compares them).
//
// Usage: lmserve-example [host:port]   (default 127.0.0.1:50051)
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	lmservev1 "github.com/lmserve/lmserve/gen/go/lmserve/v1"
)

const (
	defaultAddress = "127.0.0.1:50051"
	generateModel  = "tiny-gpt2"
	embedModel     = "tiny-encoder"
	prompt         = "To be, or not"
	maxNewTokens   = 16
	// Every call gets a deadline, so a stuck server fails the example instead of hanging it.
	callTimeout = 60 * time.Second
)

var embedTexts = []string{"The cat sat on the mat.", "A dog lay on the rug."}

func main() {
	address := defaultAddress
	if len(os.Args) > 1 {
		address = os.Args[1]
	}
	// lmserve serves plaintext unless its [tls] section is set; use credentials.NewTLS then.
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail("connect", err)
	}
	defer conn.Close()
	client := lmservev1.NewInferenceClient(conn)

	if err := generate(client); err != nil {
		fail("GenerateStream", err)
	}
	if err := embed(client); err != nil {
		fail("Embed", err)
	}
}

// generate prints the prompt, then each token's text as its message arrives.
func generate(client lmservev1.InferenceClient) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	stream, err := client.GenerateStream(ctx, &lmservev1.GenerateRequest{
		Model:  generateModel,
		Prompt: &lmservev1.GenerateRequest_Text{Text: prompt},
		// Greedy, so every client (and the Python test) gets the same text.
		Parameters: &lmservev1.GenerationParameters{
			MaxNewTokens: proto.Uint32(maxNewTokens),
			DoSample:     proto.Bool(false),
		},
	})
	if err != nil {
		return err
	}
	fmt.Print(prompt)
	var text strings.Builder
	var servedBy *lmservev1.ServedBy
	finish := lmservev1.FinishReason_FINISH_REASON_UNSPECIFIED
	// One sequence (n unset), so every message belongs to index 0.
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			fmt.Println()
			return err
		}
		if servedBy == nil { // only the first message carries it
			servedBy = msg.GetServedBy()
		}
		fmt.Print(msg.GetText())
		text.WriteString(msg.GetText())
		if msg.GetFinishReason() != lmservev1.FinishReason_FINISH_REASON_UNSPECIFIED {
			finish = msg.GetFinishReason()
		}
	}
	fmt.Println()
	fmt.Printf("generate: text=%s finish=%s served_by=%s@%s\n",
		jsonString(text.String()), finish, servedBy.GetModel(), servedBy.GetVersion())
	return nil
}

// embed prints each vector's size and first values, then the cosine similarity of the two.
func embed(client lmservev1.InferenceClient) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	resp, err := client.Embed(ctx, &lmservev1.EmbedRequest{Model: embedModel, Texts: embedTexts})
	if err != nil {
		return err
	}
	vectors := resp.GetEmbeddings()
	if len(vectors) != len(embedTexts) {
		return fmt.Errorf("asked for %d embeddings, got %d", len(embedTexts), len(vectors))
	}
	for i, e := range vectors {
		first := make([]string, 0, 4)
		for _, v := range e.GetValues()[:min(4, len(e.GetValues()))] {
			first = append(first, fmt.Sprintf("%.6f", v))
		}
		fmt.Printf("vector[%d]: dim=%d first=[%s]\n", i, len(e.GetValues()), strings.Join(first, ", "))
	}
	fmt.Printf("embed: n=%d dim=%d cosine=%.8f\n",
		len(vectors), len(vectors[0].GetValues()), cosine(vectors[0].GetValues(), vectors[1].GetValues()))
	return nil
}

// cosine sums in float64: the float32 values are exact in it, so every client agrees closely.
func cosine(a, b []float32) float64 {
	var dot, na, nb float64
	for i := range a {
		dot += float64(a[i]) * float64(b[i])
		na += float64(a[i]) * float64(a[i])
		nb += float64(b[i]) * float64(b[i])
	}
	return dot / math.Sqrt(na*nb)
}

// jsonString quotes s as JSON without Go's HTML escaping of <, > and &.
func jsonString(s string) string {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s) // a string always encodes
	return strings.TrimSuffix(buf.String(), "\n")
}

// codeNames are the canonical gRPC names, which the other clients print; Go spells them
// differently (DeadlineExceeded, Canceled).
var codeNames = [...]string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT",
	"DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
	"RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
	"INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}

func codeName(c codes.Code) string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return c.String()
}

// fail reports an RPC error's status and exits non-zero; a non-RPC error reads as UNKNOWN.
func fail(call string, err error) {
	st := status.Convert(err)
	fmt.Fprintf(os.Stderr, "error: %s failed: code=%s message=%s\n", call, codeName(st.Code()), st.Message())
	os.Exit(1)
}
