// The Switchboard demo client: conversations, a thread with paged history, sends with
// their states, receipts, typing, blocks, permissions, broadcasts, reports, the
// moderation queue and image attachments, all from the public API and the stream.

import { Api, ApiError, uploadToStore } from "./api.js";
import { Stream } from "./stream.js";

const PAGE = 20; // history page size: small, so that scrolling up pages early
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ the token
// The link `switchboard up` prints is /demo/#token=<JWT>&peers=a,b: the fragment never
// leaves the browser. Kept in sessionStorage (this tab only) so a reload still works,
// and taken out of the address bar so it is not shared by copying the URL.
function readFragment() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("token");
  if (token) {
    sessionStorage.setItem("switchboard.token", token);
    sessionStorage.setItem("switchboard.peers", fragment.get("peers") || "");
    history.replaceState(null, "", location.pathname);
  }
  return {
    token: sessionStorage.getItem("switchboard.token"),
    peers: (sessionStorage.getItem("switchboard.peers") || "").split(",").filter(Boolean),
  };
}

// -------------------------------------------------------------------- helpers
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function timeText(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function clientId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

function describeError(error) {
  if (error instanceof ApiError) return `${error.message} (${error.code})`;
  return String(error);
}

const DELETED_TEXT = {
  removed_by_moderator: "Message removed by a moderator",
  deleted_by_sender: "Message deleted by its sender",
  expired: "Message expired",
};

function deletedText(deleted) {
  return DELETED_TEXT[deleted.reason] || `Message deleted (${deleted.reason || "no reason"})`;
}

function debounce(fn, ms) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}

// ---------------------------------------------------------------------- state
const state = {
  api: null,
  stream: null,
  me: null,
  peers: [],
  conversations: new Map(), // id -> conversation (as GET /v1/conversations lists it)
  names: new Map(), // user id -> display name
  blocked: new Set(),
  open: null, // the open conversation's id
  thread: null, // {messages: Map(id -> message), order: [ids], cursor, loading}
  pending: new Map(), // message id -> {conversation_id} for sends not yet decided
  receipts: new Map(), // conversation id -> the other side's last read message id
  typingTimer: null,
  lastTypingSent: 0,
  attachment: null, // {id, file, previewUrl} once uploaded, for the next send
  broadcasts: new Map(),
  isModerator: false,
};

function nameOf(userId) {
  if (state.me && userId === state.me.id) return "You";
  return state.names.get(userId) || userId;
}

// ------------------------------------------------------------------- the list
async function loadConversations() {
  const page = await state.api.get("/v1/conversations?limit=50");
  state.conversations = new Map(page.items.map((item) => [item.id, item]));
  for (const conversation of page.items) {
    for (const person of conversation.participants) state.names.set(person.id, person.display_name);
  }
  renderConversations();
}

const refreshConversations = debounce(() => loadConversations().catch(() => {}), 150);

function otherOf(conversation) {
  return conversation.other_participants[0] || { id: "?", display_name: "(nobody)" };
}

function previewText(conversation) {
  const last = conversation.last_message;
  if (!last) return "No messages yet";
  const who = last.sender_id === state.me.id ? "You: " : "";
  if (last.deleted) return who + deletedText(last.deleted);
  if (last.preview) return who + last.preview;
  if (last.attachment_count) return `${who}📷 Image`;
  return who;
}

function renderConversations() {
  const list = $("conversation-list");
  list.replaceChildren();
  let total = 0;
  for (const conversation of state.conversations.values()) {
    const other = otherOf(conversation);
    const unread = conversation.unread_count;
    total += unread;
    const badge = unread
      ? el("span", { class: "badge", "data-testid": "unread", "aria-label": `${unread} unread` }, String(unread))
      : null;
    const button = el(
      "button",
      {
        type: "button",
        class: "conversation",
        "data-conversation": conversation.id,
        "aria-current": conversation.id === state.open ? "true" : null,
        onclick: () => openConversation(conversation.id),
      },
      el("span", { class: "who" }, other.display_name, " ", el("span", { class: "role" }, other.role)),
      badge,
      el("span", { class: "preview" }, previewText(conversation)),
      el("time", { class: "when" }, timeText(conversation.last_activity_at)),
    );
    list.append(el("li", {}, button));
  }
  $("conversations-empty").hidden = state.conversations.size > 0;
  const badge = $("unread-total");
  badge.hidden = total === 0;
  badge.textContent = String(total);
  badge.setAttribute("aria-label", `${total} unread`);
}

// ------------------------------------------------------------- the people panel
async function loadBlocks() {
  const blocks = await state.api.get("/v1/blocks");
  state.blocked = new Set(blocks.items);
}

async function renderPerson(userId) {
  const list = $("people-list");
  let item = list.querySelector(`[data-person="${CSS.escape(userId)}"]`);
  if (!item) {
    item = el("li", { "data-person": userId });
    list.append(item);
  }
  let permission;
  try {
    permission = await state.api.get(`/v1/permissions/${encodeURIComponent(userId)}`);
  } catch (error) {
    item.replaceChildren(el("span", { class: "who" }, userId), el("span", { class: "why" }, describeError(error)));
    return;
  }
  const whyId = `why-${userId.replace(/[^A-Za-z0-9_-]/g, "_")}`;
  const existing = permission.conversation_id;
  // Seed 001: the start button is disabled, with the rule that says no beside it.
  const canOpen = permission.can_start || Boolean(existing);
  const button = el(
    "button",
    {
      type: "button",
      disabled: !canOpen,
      "aria-describedby": canOpen ? null : whyId,
      onclick: () => startConversation(userId),
    },
    existing ? "Open conversation" : "Message",
  );
  const why = canOpen
    ? null
    : el(
        "span",
        { class: "why", id: whyId, "data-testid": "why-not" },
        `Why not: ${permission.reason || "not allowed"}${permission.rule ? ` (${permission.rule})` : ""}`,
      );
  const name = nameOf(userId);
  const label = name === userId ? userId : `${name} (${userId})`;
  item.replaceChildren(...[el("span", { class: "who" }, label), button, why].filter(Boolean));
}

async function renderPeople() {
  for (const peer of state.peers) {
    if (peer !== state.me.id) await renderPerson(peer);
  }
}

async function startConversation(userId) {
  try {
    const conversation = await state.api.post("/v1/conversations", { participant_id: userId });
    await loadConversations();
    openConversation(conversation.id);
    renderPerson(userId); // now "Open conversation"
  } catch (error) {
    await renderPerson(userId);
    alertFatal(`Could not start the conversation: ${describeError(error)}`, true);
  }
}

// ------------------------------------------------------------------ the thread
async function openConversation(conversationId) {
  state.open = conversationId;
  state.thread = { messages: new Map(), order: [], cursor: null, loading: false };
  clearAttachment();
  $("composer-error").textContent = "";
  $("typing").textContent = "";
  $("message-list").replaceChildren();
  $("thread-pane").hidden = false;
  $("panes").classList.add("showing-thread");
  let conversation = state.conversations.get(conversationId);
  if (!conversation) {
    conversation = await state.api.get(`/v1/conversations/${conversationId}`);
    state.conversations.set(conversationId, conversation);
  }
  const other = otherOf(conversation);
  $("thread-title").textContent = `${other.display_name} (${other.role})`;
  renderBlockButton();
  renderConversations();
  await loadOlder();
  scrollToBottom();
  $("thread-title").focus();
  markRead();
}

function closeConversation() {
  const was = state.open;
  state.open = null;
  state.thread = null;
  $("thread-pane").hidden = true;
  $("panes").classList.remove("showing-thread");
  renderConversations();
  const button = document.querySelector(`[data-conversation="${was}"]`);
  if (button) button.focus();
}

async function loadOlder() {
  const thread = state.thread;
  if (!thread || thread.loading || thread.done) return;
  thread.loading = true;
  const conversationId = state.open;
  const query = new URLSearchParams({ limit: String(PAGE) });
  if (thread.cursor) query.set("before", thread.cursor);
  try {
    const page = await state.api.get(`/v1/conversations/${conversationId}/messages?${query}`);
    if (state.open !== conversationId) return;
    const box = $("messages");
    const fromBottom = box.scrollHeight - box.scrollTop;
    // Newest first from the API: prepend each, so the oldest ends on top.
    for (const message of page.items) upsertMessage(message, { prepend: true });
    thread.cursor = page.next_cursor;
    thread.done = !page.next_cursor;
    $("older").hidden = thread.done;
    // Keep what the reader was looking at in place while older messages appear above.
    box.scrollTop = box.scrollHeight - fromBottom;
    renderReceipts();
  } finally {
    thread.loading = false;
  }
}

function scrollToBottom() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function messageNode(message) {
  const mine = message.sender_id === state.me.id;
  const node = el("li", {
    class: `message ${mine ? "mine" : "theirs"}`,
    "data-id": message.id,
    "data-client-id": message.client_id || null,
  });
  fillMessage(node, message);
  return node;
}

function fillMessage(node, message) {
  const mine = message.sender_id === state.me.id;
  const children = [
    el("p", { class: "meta" }, el("span", { class: "sender" }, nameOf(message.sender_id)), " ",
      el("time", { datetime: message.created_at || "" }, timeText(message.created_at))),
  ];
  if (message.deleted) {
    node.classList.add("deleted");
    children.push(el("p", { class: "body placeholder", "data-testid": "placeholder" }, deletedText(message.deleted)));
  } else {
    if (message.body) children.push(el("p", { class: "body" }, message.body));
    const attachments = message.attachments || [];
    if (attachments.length) {
      children.push(el("div", { class: "attachments" }, attachments.map(attachmentNode)));
    }
  }
  if (mine) {
    children.push(el("p", { class: "status", "data-status": message.status }, statusText(message)));
  }
  const actions = [];
  if (!message.deleted && message.status === "stored") {
    if (mine) {
      actions.push(el("button", { type: "button", onclick: () => deleteMessage(message.id) }, "Delete"));
    } else {
      actions.push(el("button", { type: "button", onclick: () => openReport(message) }, "Report"));
    }
  }
  if (message.status === "failed_to_send") {
    actions.push(el("button", { type: "button", onclick: () => retrySend(message) }, "Retry"));
  }
  if (actions.length) children.push(el("div", { class: "actions" }, actions));
  node.replaceChildren(...children);
}

function statusText(message) {
  switch (message.status) {
    case "sending":
      return "Sending…";
    case "queued":
      return "Queued";
    case "stored":
      return "Stored";
    case "rejected":
      return `Rejected: ${message.reason || "refused"}`;
    case "failed_to_send":
      return `Not sent: ${message.reason}`;
    default:
      return message.status;
  }
}

function attachmentNode(attachment) {
  if (attachment.status !== "ready" || !attachment.thumbnail_url) {
    return el("span", { class: "attachment-note" }, `${attachment.filename}: ${attachment.status}`);
  }
  return el(
    "button",
    {
      type: "button",
      class: "thumb",
      "aria-label": `Open image ${attachment.filename}`,
      onclick: () => showImage(attachment),
    },
    el("img", { src: attachment.thumbnail_url, alt: attachment.filename, "data-testid": "thumbnail" }),
  );
}

function showImage(attachment) {
  const image = $("image-full");
  image.src = attachment.url;
  image.alt = attachment.filename;
  $("image-dialog").showModal();
}

// Messages of the open thread by id: history, our own sends and the stream's
// message.created all come here, so a message is shown once whichever arrives first.
function upsertMessage(message, { prepend = false } = {}) {
  const thread = state.thread;
  if (!thread || message.conversation_id !== state.open) return;
  const list = $("message-list");
  let node = list.querySelector(`[data-id="${message.id}"]`);
  if (!node && message.client_id) node = list.querySelector(`[data-client-id="${CSS.escape(message.client_id)}"]`);
  const previous = thread.messages.get(message.id);
  const merged = { ...(previous || {}), ...message };
  thread.messages.set(message.id, merged);
  if (node) {
    node.dataset.id = message.id;
    fillMessage(node, merged);
    return;
  }
  node = messageNode(merged);
  if (prepend) {
    list.prepend(node);
  } else {
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    list.append(node);
    if (atBottom || merged.sender_id === state.me.id) scrollToBottom();
  }
}

// The other side's receipt: every message of mine up to the one they read shows "Read".
function renderReceipts() {
  const readId = state.open && state.receipts.get(state.open);
  if (!readId) return;
  const nodes = [...$("message-list").children];
  const index = nodes.findIndex((node) => node.dataset.id === readId);
  if (index < 0) return;
  nodes.forEach((node, position) => {
    if (position > index || !node.classList.contains("mine")) return;
    const status = node.querySelector(".status");
    if (status && !node.querySelector(".receipt")) {
      status.append(el("span", { class: "receipt", "data-testid": "receipt" }, " · Read"));
    }
  });
}

function markRead() {
  if (!state.open || document.visibilityState === "hidden") return;
  const conversationId = state.open;
  state.api
    .post(`/v1/conversations/${conversationId}/read`, {})
    .then(() => {
      const conversation = state.conversations.get(conversationId);
      if (conversation) conversation.unread_count = 0;
      renderConversations();
    })
    .catch(() => {});
}

// --------------------------------------------------------------------- sending
async function send(event) {
  event.preventDefault();
  if (!state.open) return;
  const box = $("compose-body");
  const body = box.value.trim();
  const attachment = state.attachment;
  if (!body && !attachment) return;
  const message = {
    id: `local-${clientId()}`,
    client_id: clientId(),
    conversation_id: state.open,
    sender_id: state.me.id,
    body,
    status: "sending",
    created_at: new Date().toISOString(),
    attachment_ids: attachment ? [attachment.id] : [],
  };
  box.value = "";
  clearAttachment();
  $("composer-error").textContent = "";
  upsertMessage(message);
  await submit(message);
  box.focus();
}

async function submit(message) {
  const payload = { body: message.body, client_id: message.client_id };
  if (message.attachment_ids.length) payload.attachment_ids = message.attachment_ids;
  const localId = message.id;
  try {
    const accepted = await state.api.post(`/v1/conversations/${message.conversation_id}/messages`, payload);
    // The same client_id always gets the same id: a retry lands here too.
    const node = $("message-list").querySelector(`[data-id="${localId}"]`);
    if (node) node.dataset.id = accepted.id;
    if (state.thread) state.thread.messages.delete(localId);
    const known = state.thread && state.thread.messages.get(accepted.id);
    if (!known || known.status !== "stored") {
      upsertMessage({ ...message, id: accepted.id, status: accepted.status });
      state.pending.set(accepted.id, message.conversation_id);
      // The stream says stored or rejected; should it be down, ask the API itself.
      setTimeout(() => checkPending(accepted.id), 4000);
    }
  } catch (error) {
    if (error.status === 0) {
      upsertMessage({ ...message, status: "failed_to_send", reason: error.message });
    } else {
      // Refused at once (a 4xx): the policy's rule, the block, the length...
      upsertMessage({ ...message, status: "rejected", reason: describeError(error) });
    }
  }
}

function retrySend(message) {
  upsertMessage({ ...message, status: "sending" });
  submit({ ...message, status: "sending" });
}

async function checkPending(messageId) {
  if (!state.pending.has(messageId)) return;
  try {
    const message = await state.api.get(`/v1/messages/${messageId}`);
    if (message.status !== "queued") {
      state.pending.delete(messageId);
      upsertMessage(message);
      renderReceipts();
      return;
    }
  } catch (error) {
    // Offline or the server is away: try again below.
  }
  setTimeout(() => checkPending(messageId), 4000);
}

async function deleteMessage(messageId) {
  try {
    const message = await state.api.delete(`/v1/messages/${messageId}`);
    if (message) upsertMessage(message);
  } catch (error) {
    $("composer-error").textContent = `Could not delete: ${describeError(error)}`;
  }
}

function onComposerKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
    return;
  }
  // The server relays typing at most once per 2 s per conversation anyway.
  const now = Date.now();
  if (state.open && now - state.lastTypingSent > 2000) {
    state.lastTypingSent = now;
    state.stream.send({ type: "typing", conversation_id: state.open });
  }
}

// ------------------------------------------------------------------ attachments
function clearAttachment() {
  if (state.attachment && state.attachment.previewUrl) URL.revokeObjectURL(state.attachment.previewUrl);
  state.attachment = null;
  $("upload").hidden = true;
  $("compose-file").value = "";
}

async function pickFile() {
  const file = $("compose-file").files[0];
  if (!file) return;
  const progress = $("upload-progress");
  const text = $("upload-text");
  const preview = $("upload-preview");
  $("upload").hidden = false;
  $("composer-error").textContent = "";
  progress.value = 0;
  text.textContent = `Uploading ${file.name}…`;
  preview.hidden = true;
  $("send").disabled = true;
  try {
    const ticket = await state.api.post("/v1/attachments", {
      filename: file.name,
      content_type: file.type || "application/octet-stream",
      size: file.size,
    });
    await uploadToStore(ticket.upload, file, (share) => {
      progress.value = Math.round(share * 100);
    });
    const previewUrl = URL.createObjectURL(file);
    state.attachment = { id: ticket.id, file, previewUrl };
    preview.src = previewUrl;
    preview.alt = `Preview of ${file.name}`;
    preview.hidden = false;
    text.textContent = `${file.name} uploaded: it goes with your next message.`;
  } catch (error) {
    state.attachment = null;
    text.textContent = "";
    $("upload").hidden = true;
    $("composer-error").textContent = `Upload failed: ${describeError(error)}`;
  } finally {
    $("send").disabled = false;
  }
}

// ---------------------------------------------------------------------- blocks
function renderBlockButton() {
  const conversation = state.conversations.get(state.open);
  if (!conversation) return;
  const other = otherOf(conversation);
  const blocked = state.blocked.has(other.id);
  const button = $("block-toggle");
  button.textContent = blocked ? `Unblock ${other.display_name}` : `Block ${other.display_name}`;
  button.setAttribute("aria-pressed", blocked ? "true" : "false");
  const note = $("block-note");
  note.hidden = !blocked;
  note.textContent = blocked ? `You block ${other.display_name}: they cannot message you.` : "";
}

async function toggleBlock() {
  const conversation = state.conversations.get(state.open);
  if (!conversation) return;
  const other = otherOf(conversation);
  try {
    if (state.blocked.has(other.id)) {
      await state.api.delete(`/v1/blocks/${encodeURIComponent(other.id)}`);
      state.blocked.delete(other.id);
    } else {
      await state.api.put(`/v1/blocks/${encodeURIComponent(other.id)}`);
      state.blocked.add(other.id);
    }
  } catch (error) {
    $("composer-error").textContent = describeError(error);
  }
  renderBlockButton();
  renderPeople();
}

// --------------------------------------------------------------------- reports
let reporting = null;

function openReport(message) {
  reporting = message;
  $("report-quote").textContent = message.body || "(image)";
  $("report-error").textContent = "";
  $("report-note").value = "";
  $("report-dialog").showModal();
  $("report-reason").focus();
}

async function submitReport(event) {
  event.preventDefault();
  if (!reporting) return;
  const body = { reason: $("report-reason").value };
  const note = $("report-note").value.trim();
  if (note) body.note = note;
  try {
    await state.api.post(`/v1/messages/${reporting.id}/reports`, body);
    const node = $("message-list").querySelector(`[data-id="${reporting.id}"]`);
    if (node) node.append(el("p", { class: "subtle", "data-testid": "reported" }, "Reported: a moderator will look at it."));
    $("report-dialog").close();
    reporting = null;
  } catch (error) {
    $("report-error").textContent = describeError(error);
  }
}

// ------------------------------------------------------------------ broadcasts
async function loadBroadcasts() {
  const page = await state.api.get("/v1/broadcasts?limit=50");
  state.broadcasts = new Map(page.items.map((item) => [item.id, item]));
  renderBroadcasts();
}

function renderBroadcasts() {
  const list = $("broadcast-list");
  list.replaceChildren();
  let unread = 0;
  for (const broadcast of state.broadcasts.values()) {
    if (broadcast.read === false) unread += 1;
    list.append(
      el(
        "li",
        { class: `broadcast${broadcast.read === false ? " unread" : ""}`, "data-broadcast": broadcast.id },
        el("p", { class: "meta" }, `${nameOf(broadcast.sender_id)} to ${broadcast.audience}`,
          broadcast.scope ? ` · ${broadcast.scope}` : "", " · ", timeText(broadcast.created_at),
          broadcast.read === false ? el("span", { class: "new" }, " · New") : null),
        el("p", { class: "body" }, broadcast.body || ""),
      ),
    );
  }
  $("broadcasts-empty").hidden = state.broadcasts.size > 0;
  const badge = $("broadcast-unread");
  badge.hidden = unread === 0;
  badge.textContent = String(unread);
  badge.setAttribute("aria-label", `${unread} new`);
}

function markBroadcastsRead() {
  for (const broadcast of state.broadcasts.values()) {
    if (broadcast.read !== false) continue;
    state.api
      .post(`/v1/broadcasts/${broadcast.id}/read`, {})
      .then(() => {
        broadcast.read = true;
        renderBroadcasts();
      })
      .catch(() => {});
  }
}

async function loadQuota() {
  const scope = $("broadcast-scope").value.trim();
  const quota = await state.api.get(`/v1/broadcasts/quota${scope ? `?scope=${encodeURIComponent(scope)}` : ""}`);
  const form = $("broadcast-form");
  form.hidden = quota.rules.length === 0;
  if (!quota.rules.length) return;
  const select = $("broadcast-audience");
  const chosen = select.value;
  const audiences = [...new Set(quota.rules.flatMap((rule) => rule.audiences))];
  select.replaceChildren(...audiences.map((audience) => el("option", { value: audience }, audience)));
  if (audiences.includes(chosen)) select.value = chosen;
  $("quota").textContent = quota.rules
    .map((rule) =>
      rule.quota === null
        ? `${rule.audiences.join(", ")}: no quota`
        : `${rule.audiences.join(", ")}: ${rule.left} of ${rule.quota} left` +
          (rule.resets_at ? ` (resets ${new Date(rule.resets_at).toLocaleString()})` : ""),
    )
    .join("; ");
}

async function sendBroadcast(event) {
  event.preventDefault();
  const result = $("broadcast-result");
  const body = $("broadcast-body").value.trim();
  if (!body) return;
  const scope = $("broadcast-scope").value.trim();
  const payload = { audience: $("broadcast-audience").value, body, client_id: clientId() };
  if (scope) payload.scope = scope;
  result.textContent = "Sending…";
  try {
    const accepted = await state.api.post("/v1/broadcasts", payload);
    result.textContent = `Broadcast ${accepted.status}.`;
    result.dataset.status = accepted.status;
    $("broadcast-body").value = "";
    followBroadcast(accepted.id);
  } catch (error) {
    result.textContent = `Refused: ${describeError(error)}`;
    result.dataset.status = "rejected";
  }
  loadQuota().catch(() => {});
}

async function followBroadcast(broadcastId, tries = 0) {
  try {
    const broadcast = await state.api.get(`/v1/broadcasts/${broadcastId}`);
    const result = $("broadcast-result");
    if (broadcast.status === "queued" && tries < 20) {
      setTimeout(() => followBroadcast(broadcastId, tries + 1), 500);
      return;
    }
    result.dataset.status = broadcast.status;
    result.textContent =
      broadcast.status === "stored"
        ? `Broadcast delivered to ${broadcast.recipient_count ?? "its"} recipient(s).`
        : `Broadcast ${broadcast.status}${broadcast.reason ? `: ${broadcast.reason}` : ""}.`;
  } catch (error) {
    // The inbox still shows it; the status line just stays at "queued".
  }
}

// ------------------------------------------------------------------ moderation
async function loadReports() {
  let page;
  try {
    page = await state.api.get("/v1/moderation/reports?status=pending&limit=50");
  } catch (error) {
    if (error.status === 403) {
      state.isModerator = false;
      $("tab-button-moderation").hidden = true;
      return;
    }
    throw error;
  }
  state.isModerator = true;
  $("tab-button-moderation").hidden = false;
  const list = $("report-list");
  list.replaceChildren();
  for (const report of page.items) {
    const message = report.message || {};
    list.append(
      el(
        "li",
        { class: "report", "data-report": report.id },
        el("p", { class: "meta" }, `${report.reporter.display_name} reported ${report.sender.display_name}: ${report.reason}`),
        el("blockquote", {}, message.deleted ? deletedText(message.deleted) : message.body || "(image)"),
        report.note ? el("p", { class: "subtle" }, `Note: ${report.note}`) : null,
        el("div", { class: "actions" },
          el("button", { type: "button", onclick: () => resolveReport(report.id, "remove") }, "Remove message"),
          el("button", { type: "button", onclick: () => resolveReport(report.id, "dismiss") }, "Dismiss")),
      ),
    );
  }
  $("reports-empty").hidden = page.items.length > 0;
  const badge = $("reports-pending");
  badge.hidden = page.items.length === 0;
  badge.textContent = String(page.items.length);
  badge.setAttribute("aria-label", `${page.items.length} pending`);
}

async function resolveReport(reportId, action) {
  const item = document.querySelector(`[data-report="${reportId}"]`);
  try {
    await state.api.post(`/v1/moderation/reports/${reportId}`, { action });
    if (item) item.replaceChildren(el("p", { role: "status" }, action === "remove" ? "Removed." : "Dismissed."));
    setTimeout(() => loadReports().catch(() => {}), 800);
  } catch (error) {
    if (item) item.append(el("p", { class: "error-text", role: "alert" }, describeError(error)));
  }
}

// --------------------------------------------------------------------- the stream
function onEvent(frame) {
  const data = frame.data || {};
  switch (frame.type) {
    case "message.created":
      state.pending.delete(data.id);
      upsertMessage(data);
      if (data.conversation_id === state.open && data.sender_id !== state.me.id) {
        $("typing").textContent = "";
        markRead();
      }
      renderReceipts();
      refreshConversations();
      break;
    case "message.deleted":
      if (state.thread && state.thread.messages.has(data.id)) {
        upsertMessage({ ...state.thread.messages.get(data.id), deleted: data.deleted, body: null });
      }
      refreshConversations();
      if (state.isModerator) loadReports().catch(() => {});
      break;
    case "message.rejected":
      state.pending.delete(data.id);
      if (state.thread && state.thread.messages.has(data.id)) {
        upsertMessage({ ...state.thread.messages.get(data.id), status: "rejected", reason: data.reason });
      }
      break;
    case "conversation.read":
      if (data.user_id !== state.me.id) {
        state.receipts.set(data.conversation_id, data.message_id);
        renderReceipts();
      } else {
        refreshConversations(); // read on another device of mine
      }
      break;
    case "broadcast.created":
      // The event carries no read state: a broadcast that just arrived is unread.
      state.broadcasts = new Map([[data.id, { read: false, ...data }], ...state.broadcasts]);
      renderBroadcasts();
      if (!$("tab-broadcasts").hidden) markBroadcastsRead();
      break;
    case "typing":
      if (data.conversation_id === state.open && data.user_id !== state.me.id) {
        $("typing").textContent = `${nameOf(data.user_id)} is typing…`;
        clearTimeout(state.typingTimer);
        state.typingTimer = setTimeout(() => {
          $("typing").textContent = "";
        }, 3000);
      }
      break;
    case "resync.required":
      // The log no longer holds what we asked for: reload everything over HTTP.
      reloadAll().catch(() => {});
      break;
    default:
      break;
  }
}

const CONNECTION_TEXT = {
  connecting: "Connecting…",
  open: "Live",
  reconnecting: "Reconnecting…",
  offline: "Offline",
  failed: "Disconnected",
};

function onStreamState(name, reason) {
  const connection = $("connection");
  connection.textContent = CONNECTION_TEXT[name] || name;
  connection.dataset.state = name;
  document.body.dataset.stream = name;
  $("offline-banner").hidden = !(name === "offline" || (name === "reconnecting" && state.stream && state.stream.everOpened));
  if (name === "failed") alertFatal(reason);
}

function alertFatal(text, transient = false) {
  const box = $("fatal");
  box.textContent = text;
  box.hidden = false;
  if (transient) setTimeout(() => (box.hidden = true), 6000);
}

// ---------------------------------------------------------------------- tabs
function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    const active = tab.dataset.tab === name;
    tab.setAttribute("aria-current", active ? "page" : "false");
    $(`tab-${tab.dataset.tab}`).hidden = !active;
  }
  if (name === "broadcasts") {
    markBroadcastsRead();
    loadQuota().catch(() => {});
  }
  if (name === "moderation") loadReports().catch(() => {});
}

// -------------------------------------------------------------------- start-up
async function reloadAll() {
  await Promise.all([loadConversations(), loadBlocks(), loadBroadcasts(), loadReports(), loadQuota()]);
  renderPeople();
  if (state.open) {
    const open = state.open;
    await openConversation(open);
  }
}

async function main() {
  const { token, peers } = readFragment();
  if (!token) {
    alertFatal("No token: open this page from a link printed by `switchboard up` (it ends in #token=…).");
    $("connection").textContent = "Not signed in";
    return;
  }
  state.api = new Api(token);
  state.peers = peers;
  try {
    state.me = await state.api.get("/v1/me");
  } catch (error) {
    alertFatal(`Cannot sign in: ${describeError(error)}`);
    $("connection").textContent = "Not signed in";
    return;
  }
  state.names.set(state.me.id, state.me.display_name);
  $("whoami").textContent = `${state.me.display_name} · ${state.me.role} · tenant ${state.me.tenant}`;
  document.title = `${state.me.display_name} · Switchboard demo`;

  // Read where the stream stands before loading over HTTP, then resume from there:
  // an event that lands between the two is replayed, none is lost.
  state.stream = new Stream({
    token,
    lastEventId: state.me.last_event_id,
    onEvent,
    onState: onStreamState,
  });
  await reloadAll();
  state.stream.start();

  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => showTab(tab.dataset.tab));
  }
  $("back").addEventListener("click", closeConversation);
  $("composer").addEventListener("submit", send);
  $("compose-body").addEventListener("keydown", onComposerKey);
  $("compose-file").addEventListener("change", pickFile);
  $("upload-cancel").addEventListener("click", clearAttachment);
  $("older").addEventListener("click", () => loadOlder());
  $("messages").addEventListener("scroll", () => {
    if ($("messages").scrollTop < 40) loadOlder();
  });
  $("block-toggle").addEventListener("click", toggleBlock);
  $("report-form").addEventListener("submit", submitReport);
  $("report-cancel").addEventListener("click", () => $("report-dialog").close());
  $("broadcast-form").addEventListener("submit", sendBroadcast);
  $("broadcast-scope").addEventListener("change", () => loadQuota().catch(() => {}));
  $("person-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const userId = $("person-id").value.trim();
    if (userId && !state.peers.includes(userId)) state.peers.push(userId);
    if (userId) renderPerson(userId);
    $("person-id").value = "";
  });
  document.addEventListener("visibilitychange", markRead);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.open && !document.querySelector("dialog[open]")) closeConversation();
  });
  document.body.dataset.ready = "true";
}

main();
