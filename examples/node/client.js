// Calls a running lmserve: streams a greedy generation from tiny-gpt2 and embeds two texts with
// tiny-encoder, ending each call with one line in a format that every example client shares
// (tests/python/test_examples.py compares them).
//
// Usage: node client.js [host:port]   (default 127.0.0.1:50051)
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const ADDRESS = process.argv[2] ?? '127.0.0.1:50051';
const GENERATE_MODEL = 'tiny-gpt2';
const EMBED_MODEL = 'tiny-encoder';
const PROMPT = 'To be, or not';
const MAX_NEW_TOKENS = 16;
const EMBED_TEXTS = ['The cat sat on the mat.', 'A dog lay on the rug.'];
// Every call gets a deadline, so a stuck server fails the example instead of hanging it.
const CALL_TIMEOUT_MS = 60_000;

// The .proto files are read at run time: no generated code to keep in step with proto/.
const definition = protoLoader.loadSync('lmserve/v1/inference.proto', {
  includeDirs: [fileURLToPath(new URL('../../proto', import.meta.url))],
  keepCase: true, // field names as the .proto spells them (max_new_tokens, served_by)
  enums: String, // FINISH_REASON_LENGTH rather than 1, as the other clients print it
  defaults: true, // unset scalars read as their zero value, as in generated code
});
const { Inference } = grpc.loadPackageDefinition(definition).lmserve.v1;

// Prints the prompt, then each token's text as its message arrives.
async function generate(client) {
  const call = client.GenerateStream(
    {
      model: GENERATE_MODEL,
      text: PROMPT,
      // Greedy, so every client (and the Python test) gets the same text.
      parameters: { max_new_tokens: MAX_NEW_TOKENS, do_sample: false },
    },
    { deadline: Date.now() + CALL_TIMEOUT_MS },
  );
  process.stdout.write(PROMPT);
  let text = '';
  let servedBy = null;
  let finish = 'FINISH_REASON_UNSPECIFIED';
  try {
    // One sequence (n unset), so every message belongs to index 0.
    for await (const msg of call) {
      servedBy ??= msg.served_by; // only the first message carries it
      process.stdout.write(msg.text);
      text += msg.text;
      if (msg.finish_reason !== 'FINISH_REASON_UNSPECIFIED') finish = msg.finish_reason;
    }
  } finally {
    process.stdout.write('\n');
  }
  console.log(`generate: text=${JSON.stringify(text)} finish=${finish} ` +
    `served_by=${servedBy?.model}@${servedBy?.version}`);
}

// Prints each vector's size and first values, then the cosine similarity of the two.
async function embed(client) {
  const response = await new Promise((resolve, reject) => {
    client.Embed(
      { model: EMBED_MODEL, texts: EMBED_TEXTS },
      { deadline: Date.now() + CALL_TIMEOUT_MS },
      (err, reply) => (err ? reject(err) : resolve(reply)),
    );
  });
  const vectors = response.embeddings.map((e) => e.values);
  if (vectors.length !== EMBED_TEXTS.length) {
    throw new Error(`asked for ${EMBED_TEXTS.length} embeddings, got ${vectors.length}`);
  }
  vectors.forEach((v, i) => {
    const first = v.slice(0, 4).map((x) => x.toFixed(6)).join(', ');
    console.log(`vector[${i}]: dim=${v.length} first=[${first}]`);
  });
  console.log(`embed: n=${vectors.length} dim=${vectors[0].length} ` +
    `cosine=${cosine(vectors[0], vectors[1]).toFixed(8)}`);
}

// JS numbers are doubles, which hold the float32 values exactly, as in the other clients.
function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / Math.sqrt(na * nb);
}

// Reports an RPC error's status and exits non-zero; an error without one reads as UNKNOWN.
async function run(name, call) {
  try {
    await call();
  } catch (err) {
    const code = grpc.status[err.code ?? grpc.status.UNKNOWN];
    console.error(`error: ${name} failed: code=${code} message=${err.details ?? err.message}`);
    process.exit(1);
  }
}

// lmserve serves plaintext unless its [tls] section is set; use credentials.createSsl() then.
const client = new Inference(ADDRESS, grpc.credentials.createInsecure());
await run('GenerateStream', () => generate(client));
await run('Embed', () => embed(client));
client.close();
