// A daggyr client in another language, built from the project's own proto/.
//
//   node tests/node/client.mjs HOST:PORT TASK_ID CMD [ARGS...]
//
// Submits the task over gRPC, follows it with WatchTask to its final state,
// reads it back with GetTask and prints one JSON object on stdout:
// {"submitted": <attempt>, "states": [<state of each watched attempt>],
//  "final": <attempt from GetTask>}. Exits 1 with the gRPC error on stderr.

import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const definition = protoLoader.loadSync("daggyr/v1/runner.proto", {
  // proto/ holds daggyr/v1 and the vendored google/api; the well-known
  // google/protobuf types come with proto-loader itself.
  includeDirs: [join(root, "proto")],
  keepCase: true, // proto field names, as the REST JSON uses them
  enums: String,
  longs: String,
  defaults: true,
  oneofs: true,
});
const { Runner } = grpc.loadPackageDefinition(definition).daggyr.v1;

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 30_000 }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

function watch(client, taskId) {
  return new Promise((resolve, reject) => {
    const states = [];
    const call = client.WatchTask({ task_id: taskId });
    call.on("data", (attempt) => states.push(attempt.state));
    call.on("error", reject);
    call.on("end", () => resolve(states));
  });
}

async function main([address, taskId, ...command]) {
  if (!address || !taskId || command.length === 0) {
    throw new Error("usage: client.mjs HOST:PORT TASK_ID CMD [ARGS...]");
  }
  const client = new Runner(address, grpc.credentials.createInsecure());
  try {
    const task = { command, memory_mb: 64, environment: { FROM: "node" } };
    const submitted = await unary(client, "SubmitTask", { task_id: taskId, task });
    const states = await watch(client, taskId);
    const final = await unary(client, "GetTask", { task_id: taskId });
    process.stdout.write(JSON.stringify({ submitted, states, final }) + "\n");
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).catch((error) => {
  process.stderr.write(`client.mjs: ${error.message}\n`);
  process.exitCode = 1;
});
