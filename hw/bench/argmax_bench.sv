// tqt_argmax with its memories: logits [rows, width] (row-major, at most ROWS, N); on `start` a
// sequencer streams each row through the unit and stores its index; `done` after the last row.
module argmax_bench #(
    parameter int ROWS = 1,
    parameter int N = 4,
    parameter int W = 32,
    parameter int INDEX_W = 16
) (
    input  logic clk,
    input  logic rst,
    input  logic start,
    input  logic load,  // read the input memories from <mem_dir>/<name>.hex
    input  logic dump,  // write the result memories to <mem_dir>/<name>.out.hex
    input  logic [15:0] rows,
    input  logic [15:0] width,
    output logic done
);
  localparam int W_H = 4 * ((W + 3) / 4);
  logic [W_H-1:0] mem_logits [ROWS*N];
  logic [INDEX_W-1:0] mem_index [ROWS];

  int r, i, value_row, finished_row;  // the value's row, then (a cycle later) the index's
  logic busy, in_valid, first, row_end, row_ended;
  logic signed [W-1:0] value;
  logic [INDEX_W-1:0] index;

  always_ff @(posedge clk) begin
    done <= 0;
    row_ended <= in_valid && row_end;
    finished_row <= value_row;
    if (rst) begin
      busy <= 0;
      in_valid <= 0;
    end else if (start) begin
      busy <= 1;
      r <= 0;
      i <= 0;
    end else begin
      in_valid <= busy;
      if (busy) begin
        value <= mem_logits[r * int'(width) + i][W-1:0];
        first <= i == 0;
        row_end <= i == int'(width) - 1;
        value_row <= r;
        if (i < int'(width) - 1) i <= i + 1;
        else begin
          i <= 0;
          if (r < int'(rows) - 1) r <= r + 1;
          else busy <= 0;
        end
      end
      if (row_ended) begin
        mem_index[finished_row] <= index;
        if (!busy && !in_valid) done <= 1;
      end
    end
  end

  // the memories' files (+mem_dir=): a whole memory per pulse, no simulator call per word
  string mem_dir;
  initial if (!$value$plusargs("mem_dir=%s", mem_dir)) mem_dir = ".";
  always @(posedge load) begin
    $readmemh({mem_dir, "/mem_logits.hex"}, mem_logits);
  end
  always @(posedge dump) begin
    $writememh({mem_dir, "/mem_index.out.hex"}, mem_index);
  end

  tqt_argmax #(.W(W), .INDEX_W(INDEX_W))
      unit (.clk(clk), .in_valid(in_valid), .first(first), .value(value), .index(index));
endmodule
