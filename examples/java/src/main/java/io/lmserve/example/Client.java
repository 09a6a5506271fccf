package io.lmserve.example;

import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.lmserve.v1.EmbedRequest;
import io.lmserve.v1.EmbedResponse;
import io.lmserve.v1.FinishReason;
import io.lmserve.v1.GenerateRequest;
import io.lmserve.v1.GenerateStreamResponse;
import io.lmserve.v1.GenerationParameters;
import io.lmserve.v1.InferenceGrpc;
import io.lmserve.v1.ServedBy;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.Iterator;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.TimeUnit;
import java.util.stream.Collectors;

/**
 * Calls a running lmserve: streams a greedy generation from tiny-gpt2 and embeds two texts with
 * tiny-encoder, ending each call with one line in a format that every example client shares
 * (tests/python/test_examples.py compares them).
 *
 * <p>Usage: {@code java -jar target/lmserve-example.jar [host:port]} (default 127.0.0.1:50051)
 */
public final class Client {
  private static final String GENERATE_MODEL = "tiny-gpt2";
  private static final String EMBED_MODEL = "tiny-encoder";
  private static final String PROMPT = "To be, or not";
  private static final int MAX_NEW_TOKENS = 16;
  private static final List<String> EMBED_TEXTS =
      List.of("The cat sat on the mat.", "A dog lay on the rug.");
  // Every call gets a deadline, so a stuck server fails the example instead of hanging it.
  private static final long CALL_TIMEOUT_SECONDS = 60;

  // Token text is UTF-8 whatever the platform's default charset; autoflush shows each token.
  private static final PrintStream OUT =
      new PrintStream(new FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);

  public static void main(String[] args) throws InterruptedException {
    String address = args.length > 0 ? args[0] : "127.0.0.1:50051";
    // lmserve serves plaintext unless its [tls] section is set; use TlsChannelCredentials then.
    ManagedChannel channel =
        Grpc.newChannelBuilder(address, InsecureChannelCredentials.create()).build();
    int exitCode = 0;
    String call = "GenerateStream";
    try {
      InferenceGrpc.InferenceBlockingStub stub = InferenceGrpc.newBlockingStub(channel);
      generate(stub);
      call = "Embed";
      embed(stub);
    } catch (StatusRuntimeException e) {
      Status status = e.getStatus();
      String message = status.getDescription() == null ? "" : status.getDescription();
      System.err.printf("error: %s failed: code=%s message=%s%n",
          call, status.getCode().name(), message);
      exitCode = 1;
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    System.exit(exitCode);
  }

  /** Prints the prompt, then each token's text as its message arrives. */
  private static void generate(InferenceGrpc.InferenceBlockingStub stub) {
    GenerateRequest request = GenerateRequest.newBuilder()
        .setModel(GENERATE_MODEL)
        .setText(PROMPT)
        // Greedy, so every client (and the Python test) gets the same text.
        .setParameters(GenerationParameters.newBuilder()
            .setMaxNewTokens(MAX_NEW_TOKENS)
            .setDoSample(false))
        .build();
    // The deadline counts from here, so it is set just before the call.
    Iterator<GenerateStreamResponse> stream = stub
        .withDeadlineAfter(CALL_TIMEOUT_SECONDS, TimeUnit.SECONDS)
        .generateStream(request);
    OUT.print(PROMPT);
    StringBuilder text = new StringBuilder();
    ServedBy servedBy = null;
    FinishReason finish = FinishReason.FINISH_REASON_UNSPECIFIED;
    try {
      // One sequence (n unset), so every message belongs to index 0.
      while (stream.hasNext()) {
        GenerateStreamResponse msg = stream.next();
        if (servedBy == null) { // only the first message carries it
          servedBy = msg.getServedBy();
        }
        OUT.print(msg.getText());
        OUT.flush();
        text.append(msg.getText());
        if (msg.getFinishReason() != FinishReason.FINISH_REASON_UNSPECIFIED) {
          finish = msg.getFinishReason();
        }
      }
    } finally {
      OUT.println();
    }
    String served = servedBy == null ? "@" : servedBy.getModel() + "@" + servedBy.getVersion();
    OUT.printf("generate: text=%s finish=%s served_by=%s%n",
        jsonString(text.toString()), finish.name(), served);
  }

  /** Prints each vector's size and first values, then the cosine similarity of the two. */
  private static void embed(InferenceGrpc.InferenceBlockingStub stub) {
    EmbedResponse response = stub
        .withDeadlineAfter(CALL_TIMEOUT_SECONDS, TimeUnit.SECONDS)
        .embed(EmbedRequest.newBuilder().setModel(EMBED_MODEL).addAllTexts(EMBED_TEXTS).build());
    if (response.getEmbeddingsCount() != EMBED_TEXTS.size()) {
      throw Status.INTERNAL
          .withDescription("asked for " + EMBED_TEXTS.size() + " embeddings, got "
              + response.getEmbeddingsCount())
          .asRuntimeException();
    }
    for (int i = 0; i < response.getEmbeddingsCount(); i++) {
      List<Float> values = response.getEmbeddings(i).getValuesList();
      String first = values.stream().limit(4)
          .map(v -> String.format(Locale.ROOT, "%.6f", v))
          .collect(Collectors.joining(", "));
      OUT.printf("vector[%d]: dim=%d first=[%s]%n", i, values.size(), first);
    }
    List<Float> a = response.getEmbeddings(0).getValuesList();
    List<Float> b = response.getEmbeddings(1).getValuesList();
    OUT.printf(Locale.ROOT, "embed: n=%d dim=%d cosine=%.8f%n",
        response.getEmbeddingsCount(), a.size(), cosine(a, b));
  }

  /** Sums in double: the float values are exact in it, so every client agrees closely. */
  private static double cosine(List<Float> a, List<Float> b) {
    double dot = 0, na = 0, nb = 0;
    for (int i = 0; i < a.size(); i++) {
      double x = a.get(i), y = b.get(i);
      dot += x * y;
      na += x * x;
      nb += y * y;
    }
    return dot / Math.sqrt(na * nb);
  }

  /** A JSON string literal; non-ASCII as \\u escapes, so the line reads the same in any locale. */
  private static String jsonString(String s) {
    StringBuilder out = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      switch (c) {
        case '"' -> out.append("\\\"");
        case '\\' -> out.append("\\\\");
        case '\n' -> out.append("\\n");
        case '\r' -> out.append("\\r");
        case '\t' -> out.append("\\t");
        default -> {
          if (c < 0x20 || c > 0x7e) {
            out.append(String.format("\\u%04x", (int) c));
          } else {
            out.append(c);
          }
        }
      }
    }
    return out.append('"').toString();
  }
}
