// Screenshots of a running TensorBoard for the docs (called by docs/tensorboard_screenshots.sh).
//   NODE_PATH=DIR/node_modules node docs/tensorboard_screenshots.cjs URL OUT_DIR
// (needs playwright-core, from npm, and /usr/bin/chromium)
const { chromium } = require("playwright-core");

(async () => {

const [url, out] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 2160, height: 400 } });

// HParams: one row per run; its columns are the overrides that differ, then the metrics
await page.goto(`${url}/#hparams`);
await page.getByText("Table view", { exact: false }).first().waitFor();
await page.waitForTimeout(3000);
await page.screenshot({ path: `${out}/tensorboard_hparams.png` });

// Images: the primary transfer attack's grid at its actual size
await page.setViewportSize({ width: 1400, height: 700 });
await page.goto(`${url}/#images&tagFilter=adversarial_examples%2Ftransfer_cwa&regexInput=default%2Ftensorboard%24`);
await page.getByText("Show actual image size").waitFor();
await page.getByText("Show actual image size").click();
await page.waitForTimeout(3000);
await page.screenshot({ path: `${out}/tensorboard_images.png` });
await browser.close();
})();
