// Runs the Khronos glTF validator (npm package gltf-validator, path in $GLTF_VALIDATOR) on each file
// given and prints one JSON object: file -> {errors, warnings, messages}. Exit 2 if it cannot run.
"use strict";
const fs = require("fs");
const validator = require(process.env.GLTF_VALIDATOR);

async function main() {
  const results = {};
  for (const file of process.argv.slice(2)) {
    const report = await validator.validateBytes(new Uint8Array(fs.readFileSync(file)), { uri: file, maxIssues: 100 });
    results[file] = {
      errors: report.issues.numErrors,
      warnings: report.issues.numWarnings,
      messages: report.issues.messages.map((m) => `${m.severity} ${m.code} ${m.pointer || ""} ${m.message}`),
    };
  }
  process.stdout.write(JSON.stringify(results));
}

main().catch((error) => { process.stderr.write(String(error) + "\n"); process.exit(2); });
