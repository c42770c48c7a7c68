// The HTTP API, as any browser client would call it: a bearer token in the
// Authorization header (never in a URL), JSON bodies, errors in the contract's
// shape {"error": {"code", "message"}} turned into ApiError.

export class ApiError extends Error {
  constructor(status, code, message, detail) {
    super(message || code);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

export class Api {
  constructor(token, base = "") {
    this.token = token;
    this.base = base;
  }

  async request(method, path, body) {
    const headers = { Authorization: `Bearer ${this.token}` };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(this.base + path, init);
    } catch (error) {
      // fetch rejects only when no answer came at all: offline, or the server is down.
      throw new ApiError(0, "network_error", "No connection to the server.");
    }
    if (response.status === 204) return null;
    let payload = null;
    try {
      payload = await response.json();
    } catch (error) {
      payload = null;
    }
    if (!response.ok) {
      const error = (payload && payload.error) || {};
      throw new ApiError(
        response.status,
        error.code || `http_${response.status}`,
        error.message || response.statusText,
        error.detail,
      );
    }
    return payload;
  }

  get(path) {
    return this.request("GET", path);
  }

  post(path, body = {}) {
    return this.request("POST", path, body);
  }

  put(path, body) {
    return this.request("PUT", path, body);
  }

  delete(path) {
    return this.request("DELETE", path);
  }
}

// The presigned S3 POST of POST /v1/attachments: the form fields, then the file last
// (the store requires that order). XMLHttpRequest rather than fetch because only it
// reports upload progress.
export function uploadToStore(upload, file, onProgress) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    for (const [name, value] of Object.entries(upload.fields || {})) form.append(name, value);
    form.append("file", file);
    const xhr = new XMLHttpRequest();
    xhr.open(upload.method || "POST", upload.url);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(1);
        resolve();
      } else {
        reject(new ApiError(xhr.status, "upload_failed", `The store refused the upload (${xhr.status}).`));
      }
    });
    xhr.addEventListener("error", () =>
      reject(new ApiError(0, "upload_failed", "The upload did not reach the store.")),
    );
    xhr.send(form);
  });
}
