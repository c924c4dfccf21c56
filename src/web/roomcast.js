// roomcast client module: connects, reconnects with backoff, and dispatches messages by type.
export class RoomcastClient extends EventTarget {
  constructor(url) {
    super();
    this.url = url;
    this.delay = 500;
    this.connect();
  }

  connect() {
    this.ws = new WebSocket(this.url);
    this.ws.onopen = () => { this.delay = 500; };
    this.ws.onmessage = (event) => {
      const message = JSON.parse(event.data);
      this.dispatchEvent(new CustomEvent(message.type, { detail: message }));
    };
    this.ws.onclose = () => {
      this.dispatchEvent(new CustomEvent("disconnected"));
      setTimeout(() => this.connect(), this.delay * (0.5 + Math.random()));
      this.delay = Math.min(this.delay * 2, 30000);
    };
  }

  send(message) {
    this.ws.send(JSON.stringify(message));
  }
}
