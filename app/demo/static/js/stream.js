// The WebSocket stream with reconnection: it remembers the last event id it handed
// on and reconnects with ?last_event_id=<it>, so the server replays exactly what was
// missed while the socket was down. Browsers cannot set headers on a WebSocket, so
// the token goes as ?token= (the one way the API offers them).

// Close codes after which reconnecting cannot help (see GET /v1/stream).
const FATAL_CLOSES = new Map([
  [4001, "The token was refused."],
  [4002, "The token expired: open a fresh link from `switchboard up`."],
  [4400, "The stream refused our last event id."],
]);

export class Stream {
  constructor({ token, lastEventId, onEvent, onState }) {
    this.token = token;
    this.lastEventId = lastEventId;
    this.onEvent = onEvent;
    this.onState = onState;
    this.socket = null;
    this.attempt = 0;
    this.timer = null;
    this.stopped = false;
    this.everOpened = false;
    // The browser tells us when the network goes: close at once rather than wait for
    // a ping to time out, and come back the moment it returns.
    window.addEventListener("offline", () => this.dropForOffline());
    window.addEventListener("online", () => this.reconnectNow());
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const params = new URLSearchParams({ token: this.token, last_event_id: String(this.lastEventId) });
    return `${scheme}//${location.host}/v1/stream?${params}`;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  connect() {
    clearTimeout(this.timer);
    this.timer = null;
    if (this.stopped || this.socket) return;
    if (navigator.onLine === false) {
      this.onState("offline");
      return;
    }
    this.onState(this.everOpened ? "reconnecting" : "connecting");
    const socket = new WebSocket(this.url());
    this.socket = socket;
    socket.addEventListener("open", () => {
      if (this.socket !== socket) return;
      this.attempt = 0;
      this.everOpened = true;
      this.onState("open");
    });
    socket.addEventListener("message", (message) => {
      if (this.socket !== socket) return;
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch (error) {
        return;
      }
      if (typeof frame.id === "number") {
        // A replay after a reconnect never repeats an event, but a frame raced by
        // our own close could: hand each id on once.
        if (frame.id <= this.lastEventId && frame.type !== "resync.required") return;
        this.lastEventId = frame.id;
      }
      this.onEvent(frame);
    });
    socket.addEventListener("close", (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      const fatal = FATAL_CLOSES.get(event.code);
      if (fatal) {
        this.stopped = true;
        this.onState("failed", fatal);
        return;
      }
      this.scheduleReconnect();
    });
  }

  scheduleReconnect() {
    if (this.stopped) return;
    this.onState(navigator.onLine === false ? "offline" : "reconnecting");
    // Exponential backoff with jitter, at most 10 s: a restarted server is not met by
    // every client at the same instant.
    const delay = Math.min(10000, 500 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
    this.attempt += 1;
    this.timer = setTimeout(() => this.connect(), delay);
  }

  dropForOffline() {
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.close();
    }
    clearTimeout(this.timer);
    this.onState("offline");
  }

  reconnectNow() {
    this.attempt = 0;
    if (!this.socket) this.connect();
  }

  send(frame) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(frame));
    }
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.socket) this.socket.close();
    this.socket = null;
  }
}
