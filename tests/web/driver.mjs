// The browser half of tests/chat_web.rs: Debian's Chromium, headless, driven
// by playwright-core. The Rust test starts chat_server (and restarts it when
// this script prints RESTART); this script opens the page as browser users,
// runs a terminal chat_client beside them, and checks what each one sees.
// Every wait has a timeout, and the whole script a deadline: it never hangs.
//
// Environment: WEB_URL (http://IP:PORT/), TCP_ADDR (chat_client's
// --connect), CHAT_CLIENT (its path), SHOT (the screenshot's path).
// stdout: progress lines, RESTART (stop the server), DOWN (the page shows
// it is reconnecting: start it again, then write UP on stdin), OK at the end.

import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join as joinPath } from "node:path";
import { createInterface } from "node:readline";

const { WEB_URL, TCP_ADDR, CHAT_CLIENT, SHOT } = process.env;
const WAIT = 20_000; // a hang guard per step, generous for a loaded machine
const deadline = setTimeout(() => {
  console.log("FAIL: the script's deadline passed");
  process.exit(3);
}, 150_000);

const stdin = createInterface({ input: process.stdin });
const fromTest = [];
let wake = null;
stdin.on("line", (l) => { fromTest.push(l); if (wake) wake(); });
async function expectFromTest(line) {
  const until = Date.now() + 60_000;
  while (!fromTest.includes(line)) {
    if (Date.now() > until) throw new Error(`no ${line} from the test`);
    await new Promise((r) => { wake = r; setTimeout(r, 1000); });
  }
}

const step = (what) => console.log(`step: ${what}`);

// A terminal user: chat_client in line mode, speaking v0.6.
class Terminal {
  constructor(nick) {
    this.lines = [];
    this.waiters = [];
    // No `nick`: it connects without a nickname (`/nick NAME` later).
    const named = nick ? ["--nick", nick] : [];
    this.child = spawn(CHAT_CLIENT, ["--connect", TCP_ADDR, ...named, "--v06"], {
      stdio: ["pipe", "pipe", "pipe"],
    });
    createInterface({ input: this.child.stdout }).on("line", (l) => {
      this.lines.push(l);
      for (const w of this.waiters) w();
    });
    createInterface({ input: this.child.stderr }).on("line", (l) => console.log(`  ${nick || "unnamed"} stderr: ${l}`));
  }
  type(line) { this.child.stdin.write(line + "\n"); }
  async waitFor(part) {
    const until = Date.now() + WAIT;
    while (!this.lines.some((l) => l.includes(part))) {
      if (Date.now() > until) throw new Error(`terminal: no line with ${JSON.stringify(part)} in ${JSON.stringify(this.lines)}`);
      await new Promise((r) => { this.waiters.push(r); setTimeout(r, 500); });
      this.waiters = [];
    }
  }
}

async function join(context, nick) {
  const page = await context.newPage();
  await page.setViewportSize({ width: 900, height: 560 });
  page.on("pageerror", (e) => console.log(`  ${nick} page error: ${e}`));
  await page.goto(WEB_URL);
  // Keyboard only: type the nickname, Enter.
  await page.locator("#nick").fill(nick);
  await page.locator("#nick").press("Enter");
  await page.locator("#status", { hasText: `connected as ${nick}` }).waitFor({ timeout: WAIT });
  await page.locator("#join").waitFor({ state: "hidden", timeout: WAIT });
  if (!(await page.locator("#input").evaluate((e) => e === document.activeElement))) {
    throw new Error("the message input does not have the focus after joining");
  }
  return page;
}

async function say(page, text) {
  await page.locator("#input").fill(text);
  await page.locator("#input").press("Enter");
}

const logText = (page) => page.locator("#log").innerText();
async function waitLog(page, part, cls = "") {
  await page.locator(`#log li${cls}`, { hasText: part }).first().waitFor({ timeout: WAIT });
}
async function assertOrder(page, parts, who) {
  const text = await logText(page);
  const at = parts.map((p) => text.indexOf(p));
  if (at.some((i) => i < 0) || at.some((i, k) => k > 0 && i < at[k - 1])) {
    throw new Error(`${who}: not in order ${JSON.stringify(parts)}: ${text}`);
  }
}
async function members(page) {
  return (await page.locator("#members li").allInnerTexts()).map((s) => s.trim()).sort();
}
async function waitMembers(page, want) {
  const listed = (want) => JSON.stringify(
    [...document.querySelectorAll("#members li")].map((li) => li.textContent.trim()).sort(),
  ) === JSON.stringify(want);
  try {
    await page.waitForFunction(listed, want, { timeout: WAIT });
  } catch {
    throw new Error(`members ${JSON.stringify(await members(page))}, want ${JSON.stringify(want)}`);
  }
}

const dir = mkdtempSync(joinPath(tmpdir(), "chatpipe-chromium-"));
let context;
const terminals = [];
try {
  context = await chromium.launchPersistentContext(dir, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  step("two browser users join");
  const ana = await join(context, "ana");
  const bo = await join(context, "bo");
  step("a terminal user joins");
  const cy = new Terminal("cy");
  terminals.push(cy);
  await waitMembers(ana, ["ana", "bo", "cy"]);
  await waitMembers(bo, ["ana", "bo", "cy"]);

  step("each says something; everyone sees it, in order");
  const lines = ["1 hello from ana", "2 hello from bo", "3 hello from cy"];
  await say(ana, lines[0]);
  await waitLog(bo, lines[0]);
  await cy.waitFor(`ana: ${lines[0]}`);
  await say(bo, lines[1]);
  await waitLog(ana, lines[1]);
  await cy.waitFor(`bo: ${lines[1]}`);
  cy.type(lines[2]);
  await waitLog(ana, lines[2]);
  await waitLog(bo, lines[2]);
  for (const [page, who] of [[ana, "ana"], [bo, "bo"]]) await assertOrder(page, lines, who);
  const cyOrder = lines.slice(0, 2).map((l) => cy.lines.findIndex((x) => x.includes(l)));
  if (!(cyOrder[0] >= 0 && cyOrder[0] < cyOrder[1])) throw new Error(`cy: out of order ${cy.lines}`);
  // Own lines are acked.
  await ana.locator("#log li.own", { hasText: lines[0] }).locator(".mark.acked").waitFor({ timeout: WAIT });

  step("a direct message reaches only its recipient");
  await say(ana, "/msg bo psst, only for bo");
  await waitLog(bo, "psst, only for bo", ".private");
  await ana.locator("#log li.own.direct", { hasText: "psst" }).locator(".mark.acked").waitFor({ timeout: WAIT });
  // A later broadcast reaches cy after where the Private would have.
  await say(ana, "4 after the secret");
  await cy.waitFor("ana: 4 after the secret");
  await waitLog(bo, "4 after the secret");
  if (cy.lines.some((l) => l.includes("psst"))) throw new Error(`cy saw the direct message: ${cy.lines}`);
  const boText = await logText(bo);
  if (boText.indexOf("psst") > boText.indexOf("4 after the secret")) throw new Error("bo: private after the later line");

  step("the screenshot: the room with three users");
  await ana.locator("#input").fill("typing, undisturbed by what arrives");
  await say(bo, "5 nice to see you all");
  await waitLog(ana, "5 nice to see you all");
  if ((await ana.locator("#input").inputValue()) !== "typing, undisturbed by what arrives") {
    throw new Error("the input changed when a message arrived");
  }
  await ana.screenshot({ path: SHOT });
  await ana.locator("#input").fill("");

  step("a phone-sized screen: no sideways scrolling, the input and members in view");
  await bo.setViewportSize({ width: 360, height: 640 });
  const fits = await bo.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth);
  if (!fits) throw new Error("the page scrolls sideways at 360 px");
  for (const id of ["#input", "#members"]) {
    const box = await bo.locator(id).boundingBox();
    if (!box || box.x < 0 || box.x + box.width > 360 || box.y + box.height > 640) {
      throw new Error(`${id} is not in view at 360x640: ${JSON.stringify(box)}`);
    }
  }
  await bo.setViewportSize({ width: 900, height: 560 });

  step("someone without a nickname is listed by address, then by the name they take");
  const eve = new Terminal(null);
  terminals.push(eve);
  const address = /^127\.0\.0\.1:\d+$/;
  const until = Date.now() + WAIT;
  while (!(await members(ana)).some((n) => address.test(n))) {
    if (Date.now() > until) throw new Error(`no unnamed member listed: ${JSON.stringify(await members(ana))}`);
    await say(ana, "/who");
    await new Promise((r) => setTimeout(r, 200));
  }
  eve.type("/nick eve");
  await waitMembers(ana, ["ana", "bo", "cy", "eve"]);
  eve.child.kill();
  await waitMembers(ana, ["ana", "bo", "cy"]);

  step("history appears on join");
  const dee = await join(context, "dee");
  for (const l of lines) await waitLog(dee, l, ".history");
  await assertOrder(dee, lines, "dee");
  if ((await logText(dee)).includes("psst")) throw new Error("dee got the direct message as history");
  await dee.close();
  await waitMembers(ana, ["ana", "bo", "cy"]);

  step("the server restarts: the pages say so and come back with their nicknames");
  console.log("RESTART");
  await ana.locator("#status", { hasText: "reconnecting" }).waitFor({ timeout: WAIT });
  await bo.locator("#status", { hasText: "reconnecting" }).waitFor({ timeout: WAIT });
  console.log("DOWN");
  await expectFromTest("UP");
  await ana.locator("#status", { hasText: "connected as ana" }).waitFor({ timeout: 30_000 });
  await bo.locator("#status", { hasText: "connected as bo" }).waitFor({ timeout: 30_000 });
  // The terminal client reconnects too, with its nickname.
  await waitMembers(ana, ["ana", "bo", "cy"]);
  await say(ana, "6 back again");
  await waitLog(bo, "6 back again");
  await ana.locator("#log li.own", { hasText: "6 back again" }).locator(".mark.acked").waitFor({ timeout: WAIT });
  console.log("OK");
} catch (e) {
  console.log(`FAIL: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  for (const t of terminals) t.child.kill();
  if (context) await context.close().catch(() => {});
  rmSync(dir, { recursive: true, force: true });
  clearTimeout(deadline);
  stdin.close();
}
