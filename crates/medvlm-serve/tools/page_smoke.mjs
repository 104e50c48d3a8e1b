// Smoke test of the web page's script (assets/index.html) against a running `medvlm serve`,
// without a browser: Node >= 18 has fetch, FormData and Blob; the DOM is a minimal stand-in.
// Usage: node page_smoke.mjs http://127.0.0.1:PORT IMAGE_FILE [API_KEY]
// Drops IMAGE_FILE on the page, runs zero-shot with the default labels, then "predict"
// (which, without an --adapted artefact, must show the service's 404 message), and prints
// what the page rendered. Exits non-zero when the page shows no probability bars.
import { readFileSync } from "node:fs";

const [base, imagePath, key] = process.argv.slice(2);
const html = await (await fetch(base + "/")).text();
const script = html.slice(html.indexOf("<script>") + 8, html.indexOf("</script>"));

class El {
  constructor(id) { this.id = id; this.children = []; this.listeners = {}; this.value = ""; this.textContent = ""; this.style = {}; this.className = ""; this.classList = { add() {}, remove() {} }; }
  addEventListener(t, f) { this.listeners[t] = f; }
  appendChild(c) { this.children.push(c); return c; }
  append(...cs) { this.children.push(...cs); }
  click() {}
  set innerHTML(v) { this.children = []; this._html = v; }
  get innerHTML() { return this._html || ""; }
  text() { return [this.textContent, ...this.children.map((c) => c.text())].filter(Boolean).join(" "); }
}
const els = {};
const byId = (id) => (els[id] ??= new El(id));
byId("labels").value = "pleural effusion; pneumothorax; no finding";
byId("template").value = "a chest x-ray showing {}";
byId("key").value = key || "";
let mode = "zero-shot";
globalThis.document = {
  getElementById: byId,
  createElement: (t) => new El(t),
  querySelector: () => ({ value: mode }),
};
const realFetch = globalThis.fetch;
globalThis.fetch = (u, o) => realFetch(base + u, o);
new Function(script)();
await new Promise((r) => setTimeout(r, 300)); // the model list
console.log("header:", byId("model").textContent);
const bytes = readFileSync(imagePath);
const file = new File([bytes], imagePath.split("/").pop());
byId("file").listeners.change({ target: { files: [file] } });
console.log("file:", byId("fname").textContent);

let bars = 0;
for (const m of ["zero-shot", "predict"]) {
  mode = m;
  await byId("go").listeners.click();
  const out = byId("out");
  const rows = out.children.flatMap((c) => c.children.filter((r) => (r.className || "").startsWith("bar")));
  if (m === "zero-shot") bars = rows.length;
  console.log(`${m}: ${out.text()}`);
  for (const r of rows) console.log("   bar", r.children[0].textContent, "width", r.children[1].children[0].style.width);
}
if (bars < 2) { console.error("no probability bars rendered"); process.exit(1); }
