// The web page of `medvlm serve` in a real headless Chromium (Debian's `chromium`, driven by
// puppeteer-core): the page loads and lists the model and artefacts, an uploaded image is
// scored through the adapted artefact with the expected top class and a conformal set, and
// zero-shot bars render. Screenshots of each state are written to OUT_DIR.
//
// Usage: node browser_check.mjs BASE_URL IMAGE_FILE ARTEFACT EXPECTED_TOP OUT_DIR
import puppeteer from "puppeteer-core";

const [base, image, artefact, expected, outDir] = process.argv.slice(2);
const fail = (msg) => { console.error("FAIL: " + msg); process.exit(1); };

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu"],
});
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 1100, height: 900 });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(base + "/", { waitUntil: "networkidle0" });
  const header = await page.$eval("#model", (e) => e.textContent);
  if (!header.trim()) fail("the page shows no model");
  const options = await page.$$eval("#artefact option", (os) => os.map((o) => o.value));
  if (!options.includes(artefact)) fail(`artefact ${artefact} not listed: ${options}`);
  await page.screenshot({ path: `${outDir}/serve_page.png` });

  // Upload through the file input (what dropping a file does) and score with the artefact.
  const input = await page.$("#file");
  await input.uploadFile(image);
  // The image as the model sees it, then with the lung preset.
  await page.waitForFunction(() => { const i = document.getElementById("preview");
    return i.style.display === "block" && i.complete && i.naturalWidth > 0; }, { timeout: 30000 });
  const autoNote = await page.$eval("#previewnote", (e) => e.textContent);
  console.log("preview: " + autoNote);
  if (!/Auto/.test(autoNote)) fail("default preview window is not auto: " + autoNote);
  await page.select("#preset", "lung");
  await page.waitForFunction(() => /CenterWidth/.test(document.getElementById("previewnote").textContent), { timeout: 30000 });
  await page.select("#preset", "");
  await page.waitForFunction(() => /Auto/.test(document.getElementById("previewnote").textContent), { timeout: 30000 });
  await page.click('input[name="mode"][value="predict"]');
  await page.select("#artefact", artefact);
  await page.click("#go");
  await page.waitForFunction(() => document.querySelectorAll("#out .bar").length > 0, { timeout: 30000 });
  const result = await page.$eval("#out", (e) => e.innerText);
  console.log("predict:\n" + result);
  const firstBar = await page.$eval("#out .bar", (e) => e.innerText);
  if (!firstBar.includes(expected)) fail(`top class is not ${expected}: ${firstBar}`);
  if (!/conformal/i.test(result)) fail("no conformal set shown");
  await page.screenshot({ path: `${outDir}/serve_predict.png`, fullPage: true });

  // Zero-shot with the default labels: one bar per label.
  await page.click('input[name="mode"][value="zero-shot"]');
  await page.click("#go");
  await page.waitForFunction(() => document.querySelectorAll("#out .bar").length >= 2, { timeout: 30000 });
  const bars = await page.$$eval("#out .bar", (bs) => bs.length);
  console.log(`zero-shot: ${bars} bars`);

  // A task head: the anomaly detector's map and decision.
  await page.click('input[name="mode"][value="head"]');
  const heads = await page.$$eval("#head option", (os) => os.map((o) => o.textContent));
  console.log("heads: " + heads.join("; "));
  if (!heads.some((h) => h.startsWith("anomaly detector"))) fail("no anomaly detector listed");
  await page.select("#modality", expected);
  await page.click("#go");
  await page.waitForFunction(() => { const i = document.querySelector("#out img.result");
    return (i && i.complete && i.naturalWidth > 0) || document.querySelector("#out .error"); }, { timeout: 30000 });
  const headError = await page.$("#out .error");
  if (headError) fail("the anomaly head answered: " + await page.$eval("#out .error", (e) => e.textContent));
  await page.waitForFunction(() => document.querySelector("#out canvas.result"), { timeout: 30000 });
  const head = await page.$eval("#out h2", (e) => e.textContent);
  console.log("anomaly: " + head);
  if (!/^(Anomalous|Normal): score/.test(head)) fail("no anomaly decision shown: " + head);
  await page.screenshot({ path: `${outDir}/serve_anomaly.png`, fullPage: true });

  // The literature catalogue page, filtered by task.
  await page.goto(base + "/papers", { waitUntil: "networkidle0" });
  const all = await page.$eval("#count", (e) => e.textContent);
  await page.type("#task", "segmentation");
  await page.waitForFunction((before) => document.getElementById("count").textContent !== before, { timeout: 30000 }, all);
  const seg = await page.$eval("#count", (e) => e.textContent);
  console.log(`papers: ${all}; segmentation: ${seg}`);
  const n = parseInt(seg, 10);
  if (!(n > 0 && n < parseInt(all, 10))) fail("the task filter did not narrow the catalogue");
  await page.screenshot({ path: `${outDir}/serve_papers.png` });
  await page.goto(base + "/models", { waitUntil: "networkidle0" });
  const models = await page.$eval("#out", (e) => e.innerText);
  if (!models.includes(artefact)) fail("the models page does not list " + artefact);
  if (!/1 task head/.test(models)) fail("the models page does not list the task head");
  if (errors.length) fail("page errors: " + errors.join("; "));
  console.log("OK");
} finally {
  await browser.close();
}
